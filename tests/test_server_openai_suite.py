"""vLLM's OpenAI-server tests ported to `qwen2audio serve` (the ideas of its
tests/entrypoints/openai/test_audio.py and the general parts of test_chat.py, test_completion.py and
test_basic.py), run against a real server process on the tiny random checkpoint.

The model is random, so no text content is checked: only the API contract. vLLM-specific numbers
(prompt_tokens=202 etc.) and vLLM-only features (guided decoding, LoRA, prompt_logprobs,
continuous_usage_stats, beam search, /invocations) are left out. Where we follow OpenAI instead of
vLLM (unknown roles, echo with logprobs), the test says so and checks our answer.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

MEDIA = pathlib.Path(__file__).resolve().parent / "data"  # read only; file:// URLs are allowed under it
MODEL = "tiny"
MAXIMUM_AUDIOS = 2
AUDIO_FILES = ["tone_440hz_3s.wav", "speech_en_16k.wav"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def audio_http():
    handler = functools.partial(_QuietHandler, directory=str(MEDIA))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("openai-suite") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen2audio.cli", "serve", str(tiny_checkpoint), "--port", str(port),
         "--served-model-name", MODEL, "--allowed-local-media-path", str(MEDIA),
         "--allow-remote-audio", "--allowed-host", "127.0.0.1", "--max-model-len", "2048",
         "--max-num-seqs", "5", "--limit-mm-per-prompt", json.dumps({"audio": MAXIMUM_AUDIOS})],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="EMPTY", max_retries=0, timeout=60)


def b64(name: str) -> str:
    return base64.b64encode((MEDIA / name).read_bytes()).decode()


def audio_messages(part: dict, text="What's happening in this audio?"):
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def part_for(kind: str, name: str, audio_http: str) -> dict:
    if kind == "http":
        return {"type": "audio_url", "audio_url": {"url": f"{audio_http}/{name}"}}
    if kind == "data_uri":
        return {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64(name)}"}}
    if kind == "file":
        return {"type": "audio_url", "audio_url": {"url": f"file://{MEDIA / name}"}}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": {"data": b64(name), "format": "wav"}}
    raise ValueError(kind)


TEXT_MESSAGES = [{"role": "system", "content": "you are a helpful assistant"},
                 {"role": "user", "content": "what is 1+1?"}]


def check_usage(usage, max_tokens=None, finish_reason=None):
    assert isinstance(usage, openai.types.CompletionUsage)
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if finish_reason == "length":
        assert usage.completion_tokens == max_tokens
    elif max_tokens is not None:
        assert 0 < usage.completion_tokens <= max_tokens


# ----------------------------------------------------------------------------------- test_audio.py


@pytest.mark.parametrize("kind", ["http", "data_uri", "file", "input_audio"])
def test_single_chat_session_audio(client, audio_http, kind):
    messages = audio_messages(part_for(kind, AUDIO_FILES[0], audio_http))
    cc = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                        logprobs=True, temperature=0.0, top_logprobs=5)
    assert cc.id and cc.object == "chat.completion" and cc.model == MODEL
    assert len(cc.choices) == 1
    choice = cc.choices[0]
    assert choice.index == 0
    assert choice.finish_reason in ("length", "stop")
    check_usage(cc.usage, 10, choice.finish_reason)
    # audio must take prompt tokens (Qwen2-Audio: ~25 per second of audio)
    assert cc.usage.prompt_tokens > 50
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert len(choice.logprobs.content) == cc.usage.completion_tokens
    for lp in choice.logprobs.content:
        assert len(lp.top_logprobs) == 5
        assert lp.logprob <= 0
    # multi-turn
    messages.append({"role": "assistant", "content": choice.message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    cc2 = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10)
    assert cc2.choices[0].message.content is not None
    assert cc2.usage.prompt_tokens > cc.usage.prompt_tokens


def test_same_audio_same_prompt_tokens(client, audio_http):
    """The same clip passed four ways must give the same prompt and the same greedy output."""
    outs = set()
    for kind in ["http", "data_uri", "file", "input_audio"]:
        cc = client.chat.completions.create(
            model=MODEL, messages=audio_messages(part_for(kind, AUDIO_FILES[0], audio_http)),
            max_completion_tokens=5, temperature=0.0)
        outs.add((cc.usage.prompt_tokens, cc.choices[0].message.content))
    assert len(outs) == 1, outs


def test_error_on_invalid_audio_url_type(client, audio_http):
    messages = audio_messages({"type": "audio_url", "audio_url": f"{audio_http}/{AUDIO_FILES[0]}"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                       temperature=0.0)


@pytest.mark.parametrize("kind", ["http", "input_audio"])
@pytest.mark.parametrize("name", AUDIO_FILES)
def test_chat_streaming_audio(client, audio_http, kind, name):
    messages = audio_messages(part_for(kind, name, audio_http))
    cc = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                        temperature=0.0)
    output = cc.choices[0].message.content
    stop_reason = cc.choices[0].finish_reason
    stream = client.chat.completions.create(model=MODEL, messages=messages,
                                            max_completion_tokens=10, temperature=0.0, stream=True)
    chunks, finish_count, roles, ids = [], 0, [], set()
    for i, chunk in enumerate(stream):
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
            roles.append(i)
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_count += 1
    assert finish_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    assert roles == [0], "role only in the first delta"
    assert len(ids) == 1, "one id for all chunks"
    assert "".join(chunks) == output


@pytest.mark.parametrize("n_audios", [2, 3])
def test_multi_audio_input(client, audio_http, n_audios):
    names = (AUDIO_FILES * 2)[:n_audios]
    messages = [{"role": "user", "content": [
        *({"type": "audio_url", "audio_url": {"url": f"{audio_http}/{n}"}} for n in names),
        {"type": "text", "text": "What's happening in this audio?"}]}]
    if n_audios > MAXIMUM_AUDIOS:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                           temperature=0.0)
        comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                         temperature=0.0)
        assert comp.choices[0].text is not None
    else:
        cc = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                            temperature=0.0)
        assert cc.choices[0].message.content is not None


# ------------------------------------------------------------------------------------ test_chat.py


def test_no_logprobs_chat(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=5,
                                        temperature=0.0, logprobs=False)
    assert cc.choices[0].logprobs is None


def test_zero_logprobs_chat(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=5,
                                        temperature=0.0, logprobs=True, top_logprobs=0)
    lp = cc.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content[0].top_logprobs) == 0


def test_some_logprobs_chat(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=5,
                                        temperature=0.0, logprobs=True, top_logprobs=5)
    lp = cc.choices[0].logprobs
    assert len(lp.content[0].top_logprobs) == 5
    # top_logprobs sorted descending, chosen token's logprob == max under greedy
    tops = [t.logprob for t in lp.content[0].top_logprobs]
    assert tops == sorted(tops, reverse=True)
    assert abs(lp.content[0].logprob - tops[0]) < 1e-4
    # joined bytes rebuild the text
    joined = b"".join(bytes(c.bytes) for c in lp.content)
    assert joined.decode("utf-8", errors="replace") == cc.choices[0].message.content


def test_too_many_chat_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES,
                                                max_completion_tokens=10, logprobs=True,
                                                top_logprobs=21, stream=True)
        for _ in stream:
            pass
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10,
                                       logprobs=True, top_logprobs=30, stream=False)
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10)
    assert cc.choices[0].message.content is not None


def test_top_logprobs_without_logprobs(client):
    # OpenAI: "logprobs must be set to true if top_logprobs is used" -> 400; vLLM also rejects
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=5,
                                       top_logprobs=3)


def test_streaming_logprobs_chat(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=8,
                                        temperature=0.0, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES,
                                            max_completion_tokens=8, temperature=0.0, logprobs=True,
                                            top_logprobs=2, stream=True)
    toks = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            toks += chunk.choices[0].logprobs.content
    assert [t.token for t in toks] == [t.token for t in cc.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in toks)


def test_single_chat_session(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10,
                                        logprobs=True, top_logprobs=5)
    assert cc.id is not None and len(cc.choices) == 1
    choice = cc.choices[0]
    check_usage(cc.usage, 10, choice.finish_reason)
    assert choice.message.role == "assistant"


def test_max_tokens_alias(client):
    a = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_tokens=7,
                                       temperature=0.0)
    b = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=7,
                                       temperature=0.0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_chat_streaming(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10,
                                        temperature=0.0)
    stream = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES,
                                            max_completion_tokens=10, temperature=0.0, stream=True)
    chunks, finish_count = [], 0
    for chunk in stream:
        delta = chunk.choices[0].delta
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_count += 1
    assert finish_count == 1
    assert chunk.choices[0].finish_reason == cc.choices[0].finish_reason
    assert "".join(chunks) == cc.choices[0].message.content


def test_chat_completion_stream_options(client, audio_http):
    messages = audio_messages(part_for("input_audio", AUDIO_FILES[0], audio_http))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                            temperature=0.0, stream=True,
                                            stream_options={"include_usage": False})
    for chunk in stream:
        assert chunk.usage is None

    nonstream = client.chat.completions.create(model=MODEL, messages=messages,
                                               max_completion_tokens=10, temperature=0.0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                            temperature=0.0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == []
    assert final.usage == nonstream.usage
    check_usage(final.usage, 10, nonstream.choices[0].finish_reason)
    for c in chunks[:-1]:
        assert c.usage is None
        assert len(c.choices) == 1
    assert chunks[-2].choices[0].finish_reason is not None

    for opts in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                           temperature=0.0, stream=False, stream_options=opts)


def test_extra_fields_allowed(client):
    cc = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "what is 1+1?", "extra_field": "0"}],
        temperature=0, seed=0, max_tokens=5)
    assert cc.choices[0].message.content is not None


def test_complex_message_content(client):
    a = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "what is 1+1?"}]}],
        temperature=0, seed=0, max_tokens=5)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what is 1+1?"}],
                                       temperature=0, seed=0, max_tokens=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_custom_role(client):
    """vLLM passes unknown roles to the chat template; OpenAI refuses them, and so do we."""
    for content in ("what is 1+1?", [{"type": "text", "text": "what is 1+1?"}]):
        with pytest.raises(openai.BadRequestError, match="role"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "my-custom-role", "content": content}],
                                           temperature=0, seed=0, max_tokens=5)


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64])
def test_long_seed(client, seed):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "x"}],
                                       temperature=0, seed=seed, max_tokens=3)


def test_seed_reproducible(client, audio_http):
    messages = audio_messages(part_for("input_audio", AUDIO_FILES[1], audio_http))
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=10, temperature=1.0)
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content
              for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should (almost surely) differ"
    # streaming with the same seed gives the same text
    s = client.chat.completions.create(seed=42, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == a


def test_chat_n(client, audio_http):
    messages = audio_messages(part_for("input_audio", AUDIO_FILES[0], audio_http))
    cc = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                        temperature=1.0, n=3, seed=7)
    assert [c.index for c in cc.choices] == [0, 1, 2]
    assert cc.usage.total_tokens == cc.usage.prompt_tokens + cc.usage.completion_tokens
    # OpenAI/vLLM: completion_tokens is summed over the n choices; prompt counted once
    single = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                            temperature=0.0)
    assert cc.usage.prompt_tokens == single.usage.prompt_tokens
    if all(c.finish_reason == "length" for c in cc.choices):
        assert cc.usage.completion_tokens == 18
    assert len({c.message.content for c in cc.choices}) > 1

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                            temperature=1.0, n=3, stream=True,
                                            stream_options={"include_usage": True})
    finish = {0: 0, 1: 0, 2: 0}
    roles = {0: 0, 1: 0, 2: 0}
    last = None
    for chunk in stream:
        last = chunk
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] += 1
            if c.finish_reason is not None:
                finish[c.index] += 1
    assert finish == {0: 1, 1: 1, 2: 1}
    assert roles == {0: 1, 1: 1, 2: 1}
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == single.usage.prompt_tokens


def test_stop_sequence(client):
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10,
                                        temperature=0.0)
    text = cc.choices[0].message.content
    if len(text) < 3:
        pytest.skip("greedy text too short to pick a stop string")
    stop = text[2:4] if text[2:4].isprintable() else text[2]
    cc2 = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=10,
                                         temperature=0.0, stop=[stop])
    assert cc2.choices[0].finish_reason == "stop"
    assert stop not in cc2.choices[0].message.content
    assert text.startswith(cc2.choices[0].message.content)
    check_usage(cc2.usage, 10)


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=TEXT_MESSAGES, max_tokens=3)


def test_prompt_too_long(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_tokens=5000)


def test_http_chat_no_model_name(server):
    # vLLM extension: model omitted -> the served model
    r = httpx.post(server + "/v1/chat/completions",
                   json={"messages": TEXT_MESSAGES, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    {"type": "bogus", "bogus": 1},
    {"type": "input_audio", "input_audio": {"data": "!!!not-base64!!!", "format": "wav"}},
    {"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}},
])
def test_bad_content_parts(client, part):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=audio_messages(part), max_tokens=3)


def test_input_audio_mp3(client):
    part = {"type": "input_audio", "input_audio": {"data": b64("speech_en.mp3"), "format": "mp3"}}
    cc = client.chat.completions.create(model=MODEL, messages=audio_messages(part), max_tokens=3)
    assert cc.usage.prompt_tokens > 50


def test_content_types(server):
    body = {"model": MODEL, "messages": TEXT_MESSAGES, "max_tokens": 3}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    # non-JSON body / content-type
    r = httpx.post(server + "/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code in (400, 415), r.text
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    r = httpx.get(server + "/v1/models", timeout=10)
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["data"][0]["id"] == MODEL


# ------------------------------------------------------------------------------ test_completion.py


def test_single_completion(client):
    comp = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5,
                                     temperature=0.0)
    assert comp.id is not None and comp.object == "text_completion"
    assert len(comp.choices) == 1
    ch = comp.choices[0]
    check_usage(comp.usage, 5, ch.finish_reason)
    comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                     temperature=0.0)
    assert comp.usage.prompt_tokens == 5
    assert comp.choices[0].text is not None


def test_completion_out_of_vocab(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[0, 0, 10**7], echo=True, max_tokens=5,
                                  temperature=0.0)


def test_no_logprobs(client):
    comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                     temperature=0.0, logprobs=None)
    assert comp.choices[0].logprobs is None


def test_zero_logprobs(client):
    comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                     temperature=0.0, logprobs=0)
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.top_logprobs[0]) == 1  # vLLM: the sampled token


def test_some_logprobs(client):
    comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                     temperature=0.0, logprobs=5)
    lp = comp.choices[0].logprobs
    assert 5 <= len(lp.top_logprobs[0]) <= 6
    n = comp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens).replace("\ufffd", "") or True
    offs = lp.text_offset
    assert offs == sorted(offs) and offs[0] == 0


def test_too_many_completion_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                  temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                           temperature=0.0, logprobs=30, stream=True)
        for _ in stream:
            pass
    comp = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                     temperature=0.0)
    assert comp.choices[0].text is not None


def test_completion_streaming(client):
    prompt = "What is an LLM?"
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                       stream=True)
    chunks, finish_count = [], 0
    for chunk in stream:
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_count += 1
    assert finish_count == 1
    assert chunk.choices[0].finish_reason == single.choices[0].finish_reason
    assert "".join(chunks) == single.choices[0].text


def test_parallel_streaming(client):
    n, max_tokens = 3, 5
    stream = client.completions.create(model=MODEL, prompt="What is an LLM?", max_tokens=max_tokens,
                                       n=n, stream=True, seed=3)
    chunks = [[] for _ in range(n)]
    finish_count = 0
    for chunk in stream:
        c = chunk.choices[0]
        chunks[c.index].append(c.text)
        if c.finish_reason is not None:
            finish_count += 1
    assert finish_count == n
    for ch in chunks:
        assert 1 <= len(ch) <= max_tokens + 1


def test_completion_stream_options(client):
    prompt = "What is the capital of France?"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                       stream=True, stream_options={"include_usage": False})
    for chunk in stream:
        assert chunk.usage is None
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    u = chunks[-1].usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    for opts in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                      stream=False, stream_options=opts)


def test_batch_completions(client):
    for prompts in (["Hello, my name is"] * 2, [[0, 0, 0, 0, 0]] * 2):
        batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0)
        assert len(batch.choices) == 2
        assert [c.index for c in batch.choices] == [0, 1]
        assert batch.choices[0].text == batch.choices[1].text
        one = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0.0)
        assert batch.usage.prompt_tokens == 2 * one.usage.prompt_tokens
        assert batch.usage.completion_tokens == 2 * one.usage.completion_tokens

        batch = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5,
                                          temperature=1.0, seed=5)
        assert len(batch.choices) == 4
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]

        stream = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5,
                                           temperature=0.0, stream=True)
        texts = ["", ""]
        for chunk in stream:
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1] == one.choices[0].text


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, logprobs_arg):
    """vLLM returns prompt logprobs here; this engine does not compute them, so it says so (a 400)
    rather than return logprobs for the completion alone."""
    for prompt in ("Hello, my name is", [0, 0, 0, 0, 0]):
        with pytest.raises(openai.BadRequestError, match="echo with logprobs is not supported"):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
                                      logprobs=logprobs_arg)


@pytest.mark.parametrize("stream,echo", [(False, False), (False, True), (True, False), (True, True)])
def test_echo_stream_completion(client, stream, echo):
    saying = "Hello, my name is"
    res = client.completions.create(model=MODEL, prompt=saying, max_tokens=10, temperature=0.0,
                                    echo=echo, stream=stream)
    if not stream:
        text = res.choices[0].text
        fr = res.choices[0].finish_reason
    else:
        text, fr = "", None
        for chunk in res:
            if chunk.choices and chunk.choices[0].text:
                text += chunk.choices[0].text
            if chunk.choices and chunk.choices[0].finish_reason:
                fr = chunk.choices[0].finish_reason
    assert fr in ("length", "stop")
    assert text.startswith(saying) == echo


def test_completion_with_audio(client):
    uri = "data:audio/wav;base64," + b64(AUDIO_FILES[0])
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                     extra_body={"audio": [uri]})
    check_usage(comp.usage, 5, comp.choices[0].finish_reason)
    assert comp.usage.prompt_tokens > 50
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                       extra_body={"audio": [uri]}, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == comp.choices[0].text
    # <|AUDIO|> count mismatch -> 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                  extra_body={"audio": [uri, uri]})


# --------------------------------------------------------------------- test_basic.py: cancellation


def test_request_cancellation(server, client, audio_http):
    messages = audio_messages(part_for("input_audio", AUDIO_FILES[1], audio_http))
    # streaming: read a few chunks, then close the connection
    for _ in range(3):
        stream = client.chat.completions.create(model=MODEL, messages=messages,
                                                max_completion_tokens=1500, temperature=1.0,
                                                stream=True, extra_body={"min_tokens": 1500})
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        stream.close()
    # non-streaming: client times out
    short = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=0.5)
    for _ in range(3):
        with pytest.raises(openai.APITimeoutError):
            short.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=1500,
                                          extra_body={"min_tokens": 1500})
    t0 = time.time()
    r = httpx.get(server + "/health", timeout=5)
    assert r.status_code == 200
    cc = client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_completion_tokens=5)
    assert cc.choices[0].message.content is not None
    # aborted requests must not keep generating: a fresh request should finish quickly
    assert time.time() - t0 < 20
    metrics = httpx.get(server + "/metrics", timeout=5).text
    running = [ln for ln in metrics.splitlines() if "running" in ln and not ln.startswith("#")]
    time.sleep(1.0)
    metrics = httpx.get(server + "/metrics", timeout=5).text
    running = [ln for ln in metrics.splitlines() if "running" in ln and not ln.startswith("#")]
    assert running and all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in running), running


# ------------------------------------------------- sampling parameters that must act or be refused


def test_completion_text_offset(client):
    """OpenAI/vLLM: text_offset[i] is where token i starts in `text` (vLLM sums per-token text)."""
    for prompt in ("What is an LLM?", "Hello, my name is", [0, 0, 0, 0, 0]):
        comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.0,
                                         logprobs=0)
        text, lp = comp.choices[0].text, comp.choices[0].logprobs
        for tok, off in zip(lp.tokens, lp.text_offset, strict=True):
            if not tok.startswith("bytes:"):
                assert text[off:off + len(tok)] == tok, (text, lp.tokens, lp.text_offset)


def test_logits_bias(client):
    """vLLM test_logits_bias: +100 forces the token, -100 bans the greedy tokens."""
    token_id = 100
    comp = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5,
                                     temperature=0.0, logit_bias={str(token_id): 100}, seed=42,
                                     logprobs=0)
    toks = comp.choices[0].logprobs.tokens
    assert len(set(toks)) == 1, toks
    plain = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5,
                                      temperature=0.0)
    assert comp.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("kw", [{"presence_penalty": 3}, {"frequency_penalty": -3},
                                {"presence_penalty": 1.0}, {"frequency_penalty": 1.0}])
def test_penalties(client, kw):
    """OpenAI/vLLM: penalties in [-2, 2] act on sampling; out of range -> 400."""
    out_of_range = abs(next(iter(kw.values()))) > 2
    if out_of_range:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_tokens=5, **kw)
        return
    # a strong penalty must change a greedy 30-token run that repeats tokens
    plain = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=30,
                                      temperature=0.0, logprobs=0)
    toks = plain.choices[0].logprobs.tokens
    if len(set(toks)) == len(toks):
        pytest.skip("no repeated token to penalise")
    pen = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=30,
                                    temperature=0.0, extra_body={k: 2.0 for k in kw})
    assert pen.choices[0].text != plain.choices[0].text


def test_inconsistent_tool_choice_and_tools(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "f"}})


def test_response_format_json_object(client):
    """vLLM constrains the output to JSON; a server without guided decoding should refuse (400)
    rather than silently return non-JSON."""
    try:
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "answer in JSON"}], max_tokens=10,
            response_format={"type": "json_object"})
    except openai.BadRequestError:
        return
    json.loads(resp.choices[0].message.content)
