"""Replicas on Ray Serve (issue 19): two engine replicas behind one front on a local CPU cluster.

Expected answers come from the plain single-process server on the same checkpoint, asked the same
things through the openai SDK; the crash is real (SIGKILL of a replica's process under load).
"""

from __future__ import annotations

import base64
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

from qwen2audio import Qwen2Audio  # noqa: E402
from qwen2audio.distributed.serve import APP_NAME  # noqa: E402
from qwen2audio.server.app import ServerOptions, create_app  # noqa: E402

from serving import Running, free_port  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
SPEECH = DATA / "speech_en_16k.wav"
LONG = 600  # tokens a stream is held to, so that it is still running when its replica is killed


@pytest.fixture(scope="module")
def single(tiny_checkpoint):
    model = Qwen2Audio.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", progress=False)
    running = Running(create_app(model, ServerOptions(served_model_name="tiny")))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint):
    """`qwen2audio serve --replicas 2` on a cluster this process also joins (to watch Serve's status).
    Four requests at most per replica, so that six at once are spread over both whatever the router
    guessed of their load: a burst of equal requests at once can otherwise land on one."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    command = [sys.executable, "-m", "qwen2audio.cli", "serve", str(tiny_checkpoint), "--served-model-name", "tiny",
               "--replicas", "2", "--cpus-per-replica", "0.5", "--ray-address", ray.get_runtime_context().gcs_address,
               "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "4"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        applications = serve.status().applications
        ray.shutdown()
    assert code == 0
    assert APP_NAME not in applications, "the application goes down with the command"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _audio_turn(question: str | None) -> list[dict]:
    data = base64.b64encode(SPEECH.read_bytes()).decode()
    content = [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def _answers(url: str) -> dict:
    client = _client(url)
    out = {}
    for number, question in enumerate(("What does the speaker say?", None, "Is this speech or music?")):
        reply = client.chat.completions.create(model="tiny", messages=_audio_turn(question), max_tokens=12,
                                               temperature=0)
        out[f"chat-{number}"] = (reply.choices[0].message.content, reply.usage.prompt_tokens,
                                 reply.choices[0].finish_reason)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                            max_tokens=12, temperature=0, stream=True)
    out["stream"] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    with SPEECH.open("rb") as audio:
        out["transcription"] = client.audio.transcriptions.create(model="tiny", file=audio).text
    with SPEECH.open("rb") as audio:
        verbose = client.audio.transcriptions.create(model="tiny", file=audio, response_format="verbose_json")
    out["segments"] = [(s.start, s.end, s.text) for s in verbose.segments]
    return out


def test_two_replicas_answer_as_the_single_server_does(single, replicas):
    assert _answers(replicas) == _answers(single)
    models = _client(replicas).models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_metrics_sum_both_replicas(replicas):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{replicas}/metrics").text
        if "qwen2audio_engine_replicas 2.0" in text:
            break
        time.sleep(0.2)
    assert "qwen2audio_engine_replicas 2.0" in text
    assert re.search(r'qwen2audio_requests_total\{route="/v1/chat/completions",status="200"\} \d', text)


def _engine_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "ServeReplica:qwen2audio:Qwen2AudioEngine" in " ".join(p.info["cmdline"] or [])]


def test_a_killed_replica_ends_its_streams_with_an_error_and_the_other_answers(replicas):
    client = _client(replicas)
    ended: dict[int, tuple[str, object]] = {}

    def stream(number: int) -> None:
        try:
            chunks = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Count to a thousand, take {number}"}],
                max_tokens=LONG, temperature=0, stream=True, extra_body={"min_tokens": LONG})
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            ended[number] = ("finished", finish)
        except openai.APIError as exc:
            ended[number] = ("error", str(exc))

    threads = [threading.Thread(target=stream, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "qwen2audio_requests_running 6.0" not in httpx.get(
            f"{replicas}/metrics").text:
        time.sleep(0.1)
    processes = _engine_processes()
    assert len(processes) == 2
    processes[0].send_signal(signal.SIGKILL)
    after = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Still there?"}],
                                           max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason in ("length", "stop")
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"
    outcomes = sorted(kind for kind, _ in ended.values())
    assert "error" in outcomes and "finished" in outcomes, ended
    assert all("replica" in detail for kind, detail in ended.values() if kind == "error"), ended
    assert all(detail == ["length"] for kind, detail in ended.values() if kind == "finished"), ended
    deadline = time.monotonic() + 90  # Serve replaces the dead replica
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments["Qwen2AudioEngine"].replica_states
        if states.get("RUNNING") == 2 and len(_engine_processes()) == 2:
            break
        time.sleep(0.5)
    assert states.get("RUNNING") == 2, states


class _Response:
    """What a streaming DeploymentHandle call gives: an async iterator of outputs, and cancel()."""

    def __init__(self, outputs, dies_after: int | None):
        self.outputs, self.dies_after, self.cancelled = outputs, dies_after, False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for number, output in enumerate(self.outputs):
            if number == self.dies_after:
                raise ray.exceptions.ActorDiedError()
            yield output
        if self.dies_after is not None and self.dies_after >= len(self.outputs):
            raise ray.exceptions.ActorDiedError()

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A stand-in engine deployment whose replicas die as ``plan`` says (index of the output they die at)."""

    def __init__(self, plan, outputs):
        self.plan, self.outputs, self.calls = list(plan), outputs, []
        self.generate = self

    def options(self, stream):
        assert stream
        return self

    def remote(self, prompt, params):
        self.calls.append(_Response(self.outputs, self.plan.pop(0) if self.plan else None))
        return self.calls[-1]


def _run_remote(plan):
    import asyncio

    from qwen2audio.distributed.serve import RemoteEngine
    from qwen2audio.engine.request import RequestOutput

    outputs = [RequestOutput("r", "a", [1], False), RequestOutput("r", "b", [2], True, "length", 3, 2)]
    handle = _Handle(plan, outputs)
    engine = RemoteEngine(handle, {"max_context": 100, "vocab_size": 50})

    async def collect():
        return [output async for output in engine.generate(object(), None)]

    return asyncio.run(collect()), handle


def test_a_request_whose_replica_died_before_it_started_goes_to_another():
    got, handle = _run_remote([0, 0])  # two replicas die at once, the third answers
    assert [o.delta for o in got] == ["a", "b"] and got[-1].error is None
    assert len(handle.calls) == 3 and [c.cancelled for c in handle.calls] == [True, True, False]


def test_a_stream_whose_replica_dies_after_it_started_ends_with_an_error():
    got, handle = _run_remote([1])
    assert [o.delta for o in got[:-1]] == ["a"] and len(handle.calls) == 1
    assert got[-1].finished and "replica" in got[-1].error and got[-1].finish_reason == "error"


def test_a_request_is_given_up_after_every_retry_failed():
    got, handle = _run_remote([0, 0, 0])
    assert len(got) == 1 and "replica" in got[0].error and len(handle.calls) == 3
