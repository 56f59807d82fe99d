"""The voice-chat page in headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import httpx
import pytest

from qwen2audio.api import Qwen2Audio
from qwen2audio.server.app import ServerOptions, create_app

from serving import Running

DATA = pathlib.Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={DATA / 'question_en_16k.wav'}"]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    checkpoint = tiny_checkpoint
    model = Qwen2Audio.from_pretrained(checkpoint, progress=False)
    running = Running(create_app(model, ServerOptions(served_model_name="tiny")))
    yield running, model, checkpoint
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(permissions=["microphone"], viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.sent = []
    page.on("request", lambda r: page.sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(served[0].url + "/")
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    yield page
    context.close()


def reply_of(page, index):
    """Wait for the index-th assistant reply to finish; return (its text, how it ended)."""
    page.wait_for_function(f"document.querySelectorAll('#history li.assistant')[{index}]?.dataset.done",
                           timeout=120_000)
    item = page.locator("#history li.assistant").nth(index)
    return item.locator(".text").text_content(), item.get_attribute("data-done")


def server_reply(served, body):
    """What the server answers, not streamed, to the exact request the page sent."""
    request = json.loads(body)
    request["stream"] = False
    response = httpx.post(served[0].url + "/v1/chat/completions", json=request, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_recorded_upload_and_follow_up_turns_equal_the_servers_replies(page, served):
    page.click("#record")  # fake microphone: Chromium plays question_en_16k.wav
    page.wait_for_selector('#record[aria-pressed="true"]')
    time.sleep(1.5)
    page.click("#record")
    page.wait_for_selector("#attachments li")
    page.click("#send")
    first, how = reply_of(page, 0)
    assert how == "true" and first == server_reply(served, page.sent[0])
    sent = json.loads(page.sent[0])
    assert sent["messages"][0]["content"][0]["input_audio"]["format"] in ("webm", "ogg")

    page.set_input_files("#file", str(DATA / "speech_en_16k.wav"))
    page.fill("#text", "What is said?")
    page.click("#send")
    second, _ = reply_of(page, 1)
    assert second == server_reply(served, page.sent[1])
    assert page.locator("#history li.user").nth(1).locator("audio").count() == 1

    page.fill("#text", "And then?")
    page.focus("#text")
    page.keyboard.press("Control+Enter")  # the keyboard path sends too
    third, _ = reply_of(page, 2)
    body = json.loads(page.sent[2])
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert body["messages"][1]["content"] == first and body["messages"][3]["content"] == second
    assert third == server_reply(served, page.sent[2])


def test_stop_mid_reply(page, served):
    page.fill("#max-tokens", "3000")
    page.set_input_files("#file", str(DATA / "tone_440hz_3s.wav"))
    page.click("#send")
    page.wait_for_function("document.querySelector('#history li.assistant .text')?.textContent.length > 0",
                           timeout=120_000)
    page.click("#stop")
    text, how = reply_of(page, 0)
    assert how == "stopped" and text.endswith("[stopped]")
    engine = served[1].engine
    deadline = time.time() + 30
    while engine.stats().kv_usage and time.time() < deadline:
        time.sleep(0.1)
    assert engine.stats().kv_usage == 0


def test_non_audio_upload_and_server_errors_are_shown(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.txt is not an audio file" in page.inner_text("#error")
    assert page.locator("#attachments li").count() == 0
    page.set_input_files("#file", str(DATA / "random_bytes.wav"))  # looks like audio, is not
    page.click("#send")
    page.wait_for_function("document.querySelector('#error').textContent.includes('could not answer')",
                           timeout=60_000)
    assert "cannot decode audio" in page.inner_text("#error")
    assert page.locator("#history li").count() == 0


def test_new_chat_clears_the_conversation(page):
    page.fill("#text", "Hello")
    page.click("#send")
    reply_of(page, 0)
    page.click("#new-chat")
    assert page.locator("#history li").count() == 0


def test_the_page_asks_for_the_api_key_when_the_server_wants_one(browser, served):
    own_model = Qwen2Audio.from_pretrained(served[2], progress=False)  # one engine per server
    keyed = Running(create_app(own_model, ServerOptions(served_model_name="tiny", api_key="sesame")))
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        page.goto(keyed.url + "/")
        page.fill("#text", "Hello")
        page.click("#send")
        page.wait_for_selector("#error:not([hidden])")
        assert "needs an API key" in page.inner_text("#error")
        assert page.locator("#settings").get_attribute("open") is not None
        page.fill("#api-key", "sesame")
        page.fill("#max-tokens", "3")
        page.click("#send")
        text, how = reply_of(page, 0)
        assert how == "true" and text
    finally:
        context.close()
        keyed.stop()


def test_settings_defaults_are_the_servers_and_fit_their_fields(browser, served):
    """No 404 while the page loads (the favicon is served); the settings' placeholders fit their
    fields; an untouched page sends neither temperature nor max_tokens (the server's defaults
    apply); the temperature field's limit is the one SamplingParams and the server enforce."""
    from qwen2audio.engine.request import MAX_TEMPERATURE, SamplingError, SamplingParams

    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    missing, sent = [], []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(served[0].url + "/")
    page.wait_for_load_state("networkidle")
    assert not missing
    page.click("#settings summary")
    for field in ("#temperature", "#max-tokens"):
        overflow = page.evaluate("""(selector) => {
            const input = document.querySelector(selector), style = getComputedStyle(input);
            const context = document.createElement("canvas").getContext("2d");
            context.font = `${style.fontSize} ${style.fontFamily}`;
            const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            return context.measureText(input.placeholder).width - room; }""", field)
        assert overflow < -16, (field, overflow)  # the number spinner takes about 15 px
    assert float(page.get_attribute("#temperature", "max")) == MAX_TEMPERATURE
    page.fill("#text", "Hello")
    page.click("#send")
    reply_of(page, 0)
    body = json.loads(sent[0])
    assert "temperature" not in body and "max_tokens" not in body
    context.close()
    with pytest.raises(SamplingError, match=f"temperature must be in \\[0, {MAX_TEMPERATURE:g}\\]"):
        SamplingParams(temperature=MAX_TEMPERATURE + 0.5)
    too_hot = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": MAX_TEMPERATURE + 0.5}
    assert httpx.post(served[0].url + "/v1/chat/completions", json=too_hot, timeout=60).status_code == 400
