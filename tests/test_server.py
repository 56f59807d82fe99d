"""A real server on 127.0.0.1, driven with the official openai SDK; media-policy security tests."""

from __future__ import annotations

import base64
import json
import pathlib
import socket
import time

import httpx
import numpy as np
import openai
import pytest

from qwen2audio.api import Qwen2Audio
from qwen2audio.server.app import ServerOptions, create_app
from qwen2audio.server.media import MediaPolicy

from checkpoints import greedy_oracle
from serving import Running, free_port, serve_bytes

DATA = pathlib.Path(__file__).parent / "data"
SPEECH, TONE = DATA / "speech_en_16k.wav", DATA / "tone_440hz_3s.wav"
KEY = "test-key"
TOKENS = 10


def b64(path):
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def input_audio(path):
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": "wav"}}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "tone.wav").write_bytes(TONE.read_bytes())
    return root


@pytest.fixture(scope="module")
def served(checkpoint, media_root):
    model = Qwen2Audio.from_pretrained(checkpoint, progress=False)
    options = ServerOptions(served_model_name="tiny", api_key=KEY, max_body_bytes=3 * 2**20, max_pending=4,
                            media=MediaPolicy(allow_remote=True, allowed_hosts=frozenset({"127.0.0.1"}),
                                              local_root=media_root))
    running = Running(create_app(model, options))
    yield running, model
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    reply = greedy_oracle(checkpoint, TOKENS)
    return lambda conversation, audios: reply(conversation, audios)[0]


def hf_user(*paths, text=None):
    parts = [{"type": "audio", "audio_url": str(p)} for p in paths]
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def test_chat_with_input_audio_equals_the_oracle(client, oracle):
    messages = [{"role": "user", "content": [input_audio(SPEECH), {"type": "text", "text": "What is said?"}]}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, temperature=0)
    assert response.choices[0].message.content == oracle([hf_user(SPEECH, text="What is said?")], [SPEECH])
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == TOKENS and response.usage.prompt_tokens > 160


def test_streamed_chat_equals_the_oracle_and_reports_usage(client, oracle):
    messages = [{"role": "user", "content": [input_audio(TONE), {"type": "text", "text": "What is it?"}]}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle([hf_user(TONE, text="What is it?")], [TONE])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == TOKENS and not chunks[-1].choices


def test_multi_turn_with_two_audios(client, oracle):
    first = oracle([hf_user(SPEECH, text="What is said?")], [SPEECH])
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [input_audio(SPEECH), {"type": "text", "text": "What is said?"}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64(TONE)}"}},
                                     {"type": "text", "text": "And here?"}]},
    ]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, temperature=0)
    expected = oracle([{"role": "system", "content": "You are terse."}, hf_user(SPEECH, text="What is said?"),
                       {"role": "assistant", "content": first}, hf_user(TONE, text="And here?")], [SPEECH, TONE])
    assert response.choices[0].message.content == expected


def test_n_choices_logprobs_and_seeded_sampling(client):
    messages = [{"role": "user", "content": [input_audio(TONE)]}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, n=2, seed=7,
                                              temperature=1.0, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, n=2, seed=7,
                                           temperature=1.0)
    assert [c.message.content for c in response.choices] == [c.message.content for c in again.choices]
    assert len(response.choices[0].logprobs.content) == 5
    assert len(response.choices[0].logprobs.content[0].top_logprobs) == 2


def test_raw_completion_with_audio(client, oracle):
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    expected = oracle(prompt, [TONE])
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                         extra_body={"audio": [f"data:audio/wav;base64,{b64(TONE)}"]})
    assert response.choices[0].text == expected


WINDOW_REPLY = 12  # tokens a window's reply may take here (the route's max_completion_tokens; 448 by default)
INSTRUCTIONS = {  # what the Transcriber asks a chat checkpoint (the tiny checkpoints have a chat template)
    "transcribe": "Transcribe the speech verbatim. Reply with the transcript only, without quotes or any other words.",
    "translate": "Translate the speech into English. Reply with the translation only.",
}


@pytest.fixture(scope="module")
def window_oracle(checkpoint, tmp_path_factory):
    """The oracle's cleaned greedy reply (WINDOW_REPLY tokens at most) to one task on one clip, the
    clip written out as 16 kHz samples."""
    import soundfile

    from qwen2audio import load_audio
    from qwen2audio.transcribe import clean_transcript

    reply = greedy_oracle(checkpoint, WINDOW_REPLY)
    folder = tmp_path_factory.mktemp("windows")

    def text(task, samples, name):
        path = folder / f"{name}.wav"
        soundfile.write(path, samples, 16000, subtype="FLOAT")
        return clean_transcript(reply([hf_user(path, text=INSTRUCTIONS[task])], [path])[0])

    chirp = load_audio(DATA / "chirp_40s_22k.wav")
    return {"chirp": [text("transcribe", chirp[:480000], "first"), text("transcribe", chirp[480000:], "second")],
            "tone": text("translate", load_audio(TONE), "tone")}


def test_transcription_formats(client, window_oracle):
    """A 40 s clip is two windows; each segment's text is the oracle's reply on that window alone.
    Two formats at a time (the engine batches their windows; this server admits four requests)."""
    from concurrent.futures import ThreadPoolExecutor

    data = (DATA / "chirp_40s_22k.wav").read_bytes()  # 1.8 MB: under this server's 3 MB body limit
    formats = ["json", "text", "srt", "vtt", "verbose_json"]
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(formats, pool.map(lambda fmt: client.audio.transcriptions.create(
            model="tiny", file=("chirp.wav", data), response_format=fmt,
            extra_body={"max_completion_tokens": WINDOW_REPLY, "segmentation": "fixed"}), formats), strict=True))
    first, second = window_oracle["chirp"]
    assert first and second and first != second  # the random model says something, and not the same twice
    assert results["json"].text == f"{first} {second}"
    assert results["text"] == f"{first} {second}"
    verbose = results["verbose_json"]
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 30.0, first), (30.0, 40.0, second)]
    assert verbose.text == f"{first} {second}" and verbose.duration == 40.0
    assert results["srt"] == (f"1\n00:00:00,000 --> 00:00:30,000\n{first}\n\n"
                              f"2\n00:00:30,000 --> 00:00:40,000\n{second}\n")
    assert results["vtt"] == (f"WEBVTT\n\n00:00:00.000 --> 00:00:30.000\n{first}\n\n"
                              f"00:00:30.000 --> 00:00:40.000\n{second}\n")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_transcription_rejects_a_bad_max_completion_tokens(served, value):
    response = httpx.post(served[0].url + "/v1/audio/transcriptions", headers={"authorization": f"Bearer {KEY}"},
                          files={"file": ("tone.wav", TONE.read_bytes())},
                          data={"model": "tiny", "max_completion_tokens": value}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_completion_tokens"


def test_translation(client, window_oracle):
    result = client.audio.translations.create(model="tiny", file=("tone.wav", TONE.read_bytes()),
                                              extra_body={"max_completion_tokens": WINDOW_REPLY,
                                                          "segmentation": "fixed"})  # a tone is no speech
    assert result.text == window_oracle["tone"] and result.text
    assert client.audio.translations.create(model="tiny", file=("tone.wav", TONE.read_bytes())).text == ""
    with pytest.raises(openai.BadRequestError, match="segmentation"):
        client.audio.translations.create(model="tiny", file=("tone.wav", TONE.read_bytes()),
                                         extra_body={"segmentation": "silence"})


def test_models_health_metrics(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    url = served[0].url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics").text
    assert "qwen2audio_kv_cache_usage" in metrics and "qwen2audio_time_to_first_token_seconds_bucket" in metrics
    # The gauges read the snapshot the engine thread publishes: idle here, so nothing held.
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(values["qwen2audio_kv_cache_usage"]) == 0.0
    assert float(values["qwen2audio_requests_running"]) == float(values["qwen2audio_requests_waiting"]) == 0.0


def raw_post(served, path, body, headers=None, key=KEY):
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    return httpx.post(served[0].url + path, content=body, headers=headers, timeout=60)


def chat_body(**extra):
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra})


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ("{not json", 400, "not valid JSON"),
        (chat_body(temperature=5), 400, "temperature"),
        (chat_body(messages=[]), 400, "messages"),
        (chat_body(messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]), 400,
         "unknown content part type 'video'"),
        (chat_body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(b"junk" * 100).decode(), "format": "wav"}}]}]), 400, "cannot decode audio"),
        (chat_body(messages=[{"role": "user", "content": "word " * 5000}]), 400, "context"),
        (chat_body(messages=[{"role": "user", "content": "half a pair: \ud83d"}]), 400, "unpaired surrogate U+D83D"),
        (chat_body(model="gpt-4"), 404, "does not exist"),
        (chat_body(n=8), 429, "capacity"),
    ],
)
def test_error_statuses_in_openai_shape(served, body, status, fragment):
    response = raw_post(served, "/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_401_without_key_and_413_over_the_body_limit(served, client):
    assert raw_post(served, "/v1/chat/completions", chat_body(), key=None).status_code == 401
    assert raw_post(served, "/v1/chat/completions", chat_body(), key="wrong").status_code == 401
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (4 * 2**20)}]})
    response = raw_post(served, "/v1/chat/completions", big)
    assert response.status_code == 413 and "byte limit" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[0].url + "/v1", api_key="nope", max_retries=0).models.list()


def test_disconnect_aborts_and_frees_kv_blocks(served):
    running, model = served
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 3000, "temperature": 0,
                       "messages": [{"role": "user", "content": [input_audio(TONE)]}]})
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", running.url + "/v1/chat/completions", content=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": ""' not in line:
                break
    deadline = time.time() + 30
    while model.engine.stats().kv_usage and time.time() < deadline:
        time.sleep(0.1)
    assert model.engine.stats().kv_usage == 0 and not model.engine.has_unfinished


# ----- media policy: what a request may point at -------------------------------------------------


def chat_with_url(client, url):
    messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)


@pytest.fixture
def audio_server():
    """A test server on 127.0.0.1 (allow-listed) that serves a clip or redirects."""
    with serve_bytes(TONE.read_bytes()) as served:
        yield served


def test_allowed_remote_fetch_works(client, audio_server):
    base, hits = audio_server
    assert chat_with_url(client, f"{base}/tone.wav").choices[0].finish_reason in ("length", "stop")
    assert hits == ["/tone.wav"]


@pytest.fixture
def resolver(monkeypatch):
    """Map test host names to chosen addresses; nothing leaves this machine."""
    table = {"private.test": "10.1.2.3", "loop.test": "127.0.0.1", "link.test": "169.254.169.254",
             "v6loop.test": "::1"}
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host in table:
            family = socket.AF_INET6 if ":" in table[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (table[host], 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


@pytest.mark.parametrize("url", ["http://localhost:9/a.wav", "http://[::1]:9/a.wav", "http://private.test/a.wav",
                                 "http://loop.test/a.wav", "http://link.test/latest/meta-data",
                                 "http://v6loop.test/a.wav", "http://0.0.0.0:9/a.wav"])
def test_private_loopback_and_link_local_hosts_are_refused(client, resolver, url):
    with pytest.raises(openai.BadRequestError, match="is not allowed"):
        chat_with_url(client, url)


def test_redirects_to_private_hosts_are_refused_before_connecting(client, resolver, audio_server):
    base, hits = audio_server
    with pytest.raises(openai.BadRequestError, match=r"'private\.test' is not allowed"):
        chat_with_url(client, f"{base}/redirect?to=http://private.test/a.wav")
    assert hits == ["/redirect?to=http://private.test/a.wav"]  # the redirect target was never fetched


def test_file_urls_only_inside_the_allowed_directory(client, media_root, tmp_path):
    assert chat_with_url(client, (media_root / "tone.wav").as_uri()).choices
    with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
        chat_with_url(client, "file:///etc/passwd")
    with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
        chat_with_url(client, f"file://{media_root}/../../../etc/passwd")
    outside = tmp_path / "secret.wav"
    outside.write_bytes(TONE.read_bytes())
    (media_root / "link.wav").symlink_to(outside)
    with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
        chat_with_url(client, (media_root / "link.wav").as_uri())
    with pytest.raises(openai.BadRequestError, match="must be a data: URI"):
        chat_with_url(client, str(media_root / "tone.wav"))  # a bare path is never read


def test_remote_audio_is_off_by_default():
    policy = MediaPolicy()
    from qwen2audio.errors import AudioError
    from qwen2audio.text.prompt import AudioPart

    with pytest.raises(AudioError, match="remote audio URLs are disabled"):
        policy.resolve(AudioPart("https://example.com/a.wav", "messages[0].content[0]", "url"))
    with pytest.raises(AudioError, match="file:// URLs are disabled"):
        policy.resolve(AudioPart("file:///tmp/a.wav", "messages[0].content[0]", "url"))


def test_serve_with_vllm_flags_logs_its_setup_and_drains_on_sigterm(checkpoint):
    """`qwen2audio serve MODEL` as vLLM users start it: the flags take effect, startup logs what was
    built, /health answers once ready, and SIGTERM lets the in-flight stream finish, then exits 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen2audio.cli", "serve", str(checkpoint), "--port", str(port),
         "--served-model-name", "tiny", "tiny-alias", "--max-model-len", "512", "--max-num-seqs", "8",
         "--kv-cache-memory-bytes", str(2**24), "--limit-mm-per-prompt", '{"audio": 1}', "--seed", "0",
         "--no-enable-prefix-caching", "--uvicorn-log-level", "warning", "--disable-log-requests", "--quiet",
         "--shutdown-timeout", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny", "tiny-alias"] and {c["max_model_len"] for c in cards} == {512}
        two_clips = {"model": "tiny-alias", "messages": [{"role": "user", "content": [input_audio(TONE)] * 2}]}
        assert "at most 1" in httpx.post(f"{url}/v1/chat/completions", json=two_clips).json()["error"]["message"]
        too_long = {"model": "tiny", "prompt": "Hello", "max_tokens": 600}
        assert "maximum context length is 512" in httpx.post(f"{url}/v1/completions", json=too_long).text
        body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 300, "temperature": 0,
                           "min_tokens": 300, "messages": [{"role": "user", "content": [input_audio(TONE)]}]})
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", content=body, timeout=120,
                          headers={"content-type": "application/json"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and not lines:
                    process.send_signal(signal.SIGTERM)
                lines.append(line)
        payloads = [line[6:] for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
        for fragment in ("model " + str(checkpoint), "KV cache: ", f"{2**24 // (2 * 2 * 16 * 2 * 16 * 4) - 1} blocks",
                         "max context 512 tokens", f"serving on http://127.0.0.1:{port} (models: tiny, tiny-alias)"):
            assert fragment in log, log
    finally:
        if process.poll() is None:
            process.kill()


def test_a_failing_request_gets_500_and_the_others_continue(served, client, monkeypatch):
    _, model = served
    runner = model.engine.runner
    execute = runner.execute

    def failing(step):
        if any(r.params.max_new_tokens == 7 for r in [*step.prefills, *step.decodes]):
            raise RuntimeError("kernel exploded")
        return execute(step)

    monkeypatch.setattr(runner, "execute", failing)
    doomed = raw_post(served, "/v1/chat/completions", chat_body(max_tokens=7))
    assert doomed.status_code == 500 and "kernel exploded" in doomed.json()["error"]["message"]
    fine = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert fine.usage.completion_tokens == 3
    assert httpx.get(served[0].url + "/health").status_code == 200


def test_transcription_segments_usage_and_form_checks(served, client):
    """verbose_json's segment fields as the openai SDK types them, computed from the generation:
    tokens decode to the segment's text, avg_logprob is their mean logprob, compression_ratio is
    Whisper's zlib ratio; json's usage counts a 3 s clip's 75 audio tokens (300 frames, 150 after
    the encoder's stride, 75 after pooling)."""
    import zlib

    tone = ("tone.wav", TONE.read_bytes())
    fixed = {"max_completion_tokens": WINDOW_REPLY, "segmentation": "fixed"}
    verbose = client.audio.transcriptions.create(model="tiny", file=tone, response_format="verbose_json",
                                                 extra_body=fixed)
    (segment,) = verbose.segments
    tokenizer = served[1].processor.tokenizer
    assert segment.tokens and tokenizer.decode(segment.tokens).strip().startswith(segment.text[:5])
    assert segment.avg_logprob < 0 and segment.temperature == 0.0 and segment.seek == 0 and segment.id == 0
    data = segment.text.encode()
    assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)))
    assert segment.no_speech_prob > 0.9 and verbose.usage.seconds == verbose.duration == 3.0  # a tone is no speech
    plain = client.audio.transcriptions.create(model="tiny", file=tone, extra_body=fixed)
    usage = plain.usage
    assert usage.type == "tokens" and usage.input_token_details.audio_tokens == 75
    assert usage.input_tokens == 75 + usage.input_token_details.text_tokens
    assert usage.output_tokens == len(segment.tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    warm = client.audio.transcriptions.create(model="tiny", file=tone, response_format="verbose_json",
                                              temperature=0.7, extra_body=fixed)
    assert warm.segments[0].temperature == 0.7
    for bad, param in (({"temperature": "1.5"}, "temperature"), ({"temperature": "hot"}, "temperature"),
                       ({"language": "xx"}, "language")):
        response = httpx.post(served[0].url + "/v1/audio/transcriptions", headers={"authorization": f"Bearer {KEY}"},
                              files={"file": tone}, data={"model": "tiny", **bad}, timeout=60)
        assert response.status_code == 400 and param in response.json()["error"]["message"], response.text


def test_streamed_transcription_deltas_join_to_the_whole_text(client):
    """OpenAI's transcript.text.delta events, one per window in order, then transcript.text.done;
    joined, the deltas are the non-streamed (greedy) text."""
    clip = ("chirp.wav", (DATA / "chirp_40s_22k.wav").read_bytes())
    fixed = {"max_completion_tokens": WINDOW_REPLY, "segmentation": "fixed"}  # two windows
    whole = client.audio.transcriptions.create(model="tiny", file=clip, extra_body=fixed)
    events = list(client.audio.transcriptions.create(model="tiny", file=clip, stream=True, extra_body=fixed))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) == 2 and events[-1] is done
    assert "".join(deltas) == done.text == whole.text
    assert done.usage.total_tokens == whole.usage.total_tokens
    quiet = list(client.audio.transcriptions.create(model="tiny", file=clip, stream=True,
                                                    extra_body={**fixed, "stream_options": {"include_usage": False}}))
    assert quiet[-1].type == "transcript.text.done" and quiet[-1].usage is None and quiet[-1].text == whole.text
    with pytest.raises(openai.BadRequestError, match="stream must be true or false"):
        client.audio.transcriptions.create(model="tiny", file=clip, extra_body={"stream": "yes"})


def test_every_translation_format_parses_into_the_sdks_types(client, window_oracle):
    """The translation route answers every format, each as the openai SDK types it."""
    from openai.types.audio import Translation, TranslationVerbose

    tone = ("tone.wav", TONE.read_bytes())
    fixed = {"max_completion_tokens": WINDOW_REPLY, "segmentation": "fixed"}
    text = window_oracle["tone"]
    results = {fmt: client.audio.translations.create(model="tiny", file=tone, response_format=fmt, extra_body=fixed)
               for fmt in ("json", "text", "srt", "vtt", "verbose_json")}
    assert isinstance(results["json"], Translation) and results["json"].text == text
    assert results["text"].strip() == text
    assert results["srt"] == f"1\n00:00:00,000 --> 00:00:03,000\n{text}\n"
    assert results["vtt"] == f"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n{text}\n"
    verbose = results["verbose_json"]
    assert isinstance(verbose, TranslationVerbose) and verbose.duration == 3.0 and verbose.text == text
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 3.0, text)]



def test_transcription_timestamp_granularities_and_prompt(served, client):
    """Segment timestamps are what we have; word timestamps are a clear 400, as is a granularity
    outside verbose_json (OpenAI's rule). The prompt reaches a chat checkpoint's instruction."""
    from qwen2audio.errors import InputError
    from qwen2audio.transcribe import Transcriber

    tone = ("tone.wav", TONE.read_bytes())
    fixed = {"max_completion_tokens": WINDOW_REPLY, "segmentation": "fixed"}
    verbose = client.audio.transcriptions.create(model="tiny", file=tone, response_format="verbose_json",
                                                 timestamp_granularities=["segment"], extra_body=fixed)
    assert len(verbose.segments) == 1
    with pytest.raises(openai.BadRequestError, match="word"):
        client.audio.transcriptions.create(model="tiny", file=tone, response_format="verbose_json",
                                           timestamp_granularities=["word", "segment"], extra_body=fixed)
    with pytest.raises(openai.BadRequestError, match="verbose_json"):
        client.audio.transcriptions.create(model="tiny", file=tone, timestamp_granularities=["segment"],
                                           extra_body=fixed)
    model = served[1]
    assert model.processor.chat_template.has_checkpoint_template  # the tiny checkpoint ships a chat template
    instruction = Transcriber(model, context="Kubernetes, etcd")._item(np.zeros(16000))[0]["content"][1]["text"]
    assert "Kubernetes, etcd" in instruction
    assert client.audio.transcriptions.create(model="tiny", file=tone, prompt="Kubernetes", extra_body=fixed).text
    with pytest.raises(InputError, match="chat checkpoint"):  # base checkpoints: the paper's fixed task prompts
        Transcriber(model, chat=False, context="Kubernetes")
