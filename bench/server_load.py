"""Bounded load test of `qwen2audio serve` on loopback: 64 clients, 512 requests.

    python bench/server_load.py [--model DIR] [--requests 512] [--concurrency 64] [--tokens 16]

Starts the server as a child process on 127.0.0.1 (a tiny random checkpoint unless --model is
given), then sends chat requests with 1-30 s clips (fresh noise each), streaming. 5% are aborted
after their first token, 5% are non-streamed requests for 2,000 tokens whose client gives up after
a random 0.05-1 s, 5% are malformed. Checks: every good request ends with exactly --tokens
completion tokens, every bad one gets a 4xx, no 5xx, the server counts every abandoned request as
aborted (so it stopped working on it), KV usage back to zero, server RSS stable once the encoder cache's
growth is set aside.
Prints requests/s and p50/p99 time to first token. Unmeasured warm-up passes (fresh clips each) come
first, while oneDNN's kernels per shape fill; the server's RSS, read once the idle engine has trimmed
its heap, must then not grow by more than 10% across the measured pass beyond the encoder cache's
growth (a bounded cache, reported in /metrics). Traffic never leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import soundfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from qwen2audio.engine.async_engine import IDLE_WAIT_S

from checkpoints import build_checkpoint
from serving import free_port


def wav_b64(seconds: float, rng: np.random.Generator) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, (rng.standard_normal(int(seconds * 16000)) * 0.1).clip(-1, 1), 16000,
                    format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


MALFORMED = [
    "{not json",
    json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                            "input_audio": {"data": "@@@", "format": "wav"}}]}]}),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
    json.dumps({"messages": []}),
    '{"messages": ' + "[" * 20000 + "]" * 20000 + "}",
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}),
]


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def leave(client: httpx.AsyncClient, body: str, patience: float, stats: dict) -> None:
    """A non-streamed request whose client stops waiting (and closes its connection) after ``patience`` s."""
    try:
        response = await client.post("/v1/chat/completions", content=body, timeout=patience,
                                     headers={"content-type": "application/json"})
        stats["status"].append(response.status_code)  # it finished first (should not, at 2,000 tokens)
    except httpx.TimeoutException:
        stats["left"] += 1


async def one(client: httpx.AsyncClient, kind: str, body: str, tokens: int, stats: dict) -> None:
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"}) as response:
        stats["status"].append(response.status_code)
        if kind == "bad":
            await response.aread()
            stats["bad_ok"] += 400 <= response.status_code < 500
            return
        if response.status_code != 200:
            await response.aread()
            return
        first, usage = None, None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("error"):
                stats["stream_errors"] += 1
                return
            delta = payload["choices"][0]["delta"].get("content") if payload["choices"] else None
            if delta and first is None:
                first = time.perf_counter() - started
                stats["ttft"].append(first)
                if kind == "abort":
                    stats["aborted"] += 1
                    return  # leaving the stream closes the connection: the server must abort
            if payload.get("usage"):
                usage = payload["usage"]
        stats["good_ok"] += usage is not None and usage["completion_tokens"] == tokens


async def run(url: str, args: argparse.Namespace, seed: int) -> dict:
    rng = np.random.default_rng(seed)  # fresh clips per pass: no cache hit from the first pass
    stats = {"status": [], "ttft": [], "good_ok": 0, "bad_ok": 0, "aborted": 0, "left": 0, "stream_errors": 0,
             "kinds": []}
    jobs: asyncio.Queue = asyncio.Queue()
    for index in range(args.requests):
        roll = random.Random(index).random()
        kind = "bad" if roll < 0.05 else "abort" if roll < 0.10 else "leave" if roll < 0.15 else "good"
        jobs.put_nowait((index, kind))
        stats["kinds"].append(kind)

    async def worker(client: httpx.AsyncClient) -> None:
        while not jobs.empty():
            index, kind = jobs.get_nowait()
            if kind == "bad":
                body = MALFORMED[index % len(MALFORMED)]
            elif kind == "leave":
                body = json.dumps({"model": "tiny", "max_tokens": 2000, "min_tokens": 2000,
                                   "messages": [{"role": "user", "content": f"Request {index}: tell me a story."}]})
                await leave(client, body, float(rng.uniform(0.05, 1.0)), stats)
                continue
            else:
                seconds = float(rng.uniform(1, 30))
                body = json.dumps({
                    "model": "tiny", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "input_audio", "input_audio": {"data": wav_b64(seconds, rng), "format": "wav"}},
                        {"type": "text", "text": f"Request {index}: what do you hear?"}]}]})
            await one(client, kind, body, args.tokens, stats)

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
        stats["seconds"] = time.perf_counter() - started
    return stats


def idle_rss_kb(pid: int) -> int:
    """The server's RSS once its idle engine has handed freed heap pages back (after IDLE_WAIT_S)."""
    time.sleep(2 * IDLE_WAIT_S)
    return rss_kb(pid)


def gauge(url: str, name: str) -> float:
    """A value from the server's /metrics (0 when the series is absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def settle(url: str) -> tuple[float, float]:
    """(KV usage, running requests) once both are 0, or after 10 s."""
    for _ in range(100):
        kv, running = gauge(url, "qwen2audio_kv_cache_usage"), gauge(url, "qwen2audio_requests_running")
        if kv == 0.0 and running == 0.0:
            break
        time.sleep(0.1)
    return kv, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warm-passes", type=int, default=3, help="unmeasured passes first (caches fill)")
    args = parser.parse_args()
    model = args.model or str(build_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny", seed=1))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "qwen2audio.cli", "serve", "--model", model, "--port", str(port),
                               "--served-model-name", "tiny", "--quiet", "--max-pending", "1024",
                               "--disable-log-requests"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # Warm-up passes fill what is meant to fill (allocator arenas, oneDNN kernels per shape); the
        # measured pass must then leave the RSS where it was, but for the encoder cache's growth (512 MiB
        # at most, reported in /metrics). RSS is read once the idle engine has trimmed the heap.
        rss_start = rss_kb(server.pid)
        for seed in range(args.warm_passes):
            asyncio.run(run(url, args, seed=seed))
            settle(url)
            print(f"warm-up pass {seed + 1}: server RSS {idle_rss_kb(server.pid) / 1024:.0f} MB", flush=True)
        rss_before, cache_before = idle_rss_kb(server.pid), gauge(url, "qwen2audio_encoder_cache_bytes")
        counted_before = gauge(url, "qwen2audio_requests_aborted_total")
        stats = asyncio.run(run(url, args, seed=args.warm_passes))
        kv, running = settle(url)  # the abandoned requests stop within a step or two
        rss_after, cache_after = idle_rss_kb(server.pid), gauge(url, "qwen2audio_encoder_cache_bytes")
        counted = gauge(url, "qwen2audio_requests_aborted_total") - counted_before
    finally:
        server.terminate()
        server.wait(timeout=120)
    kinds = stats["kinds"]
    good, bad, aborted, left = kinds.count("good"), kinds.count("bad"), kinds.count("abort"), kinds.count("leave")
    ttft = sorted(stats["ttft"])
    fivexx = sum(1 for s in stats["status"] if s >= 500)
    print(f"{args.requests} requests ({good} good, {aborted} aborted mid-stream, {left} non-streamed abandoned, "
          f"{bad} malformed), {args.concurrency} concurrent clients, {args.tokens} tokens each")
    print(f"wall {stats['seconds']:.1f} s = {args.requests / stats['seconds']:.1f} requests/s; "
          f"time to first token p50 {statistics.median(ttft) * 1000:.0f} ms, "
          f"p99 {ttft[int(0.99 * (len(ttft) - 1))] * 1000:.0f} ms")
    print(f"good requests with exactly {args.tokens} tokens: {stats['good_ok']}/{good}; malformed answered 4xx: "
          f"{stats['bad_ok']}/{bad}; aborted: {stats['aborted']}/{aborted}; 5xx: {fivexx}; "
          f"stream errors: {stats['stream_errors']}")
    print(f"abandoned non-streamed requests: {stats['left']}/{left} clients left; the server counted "
          f"{counted:.0f} aborted requests (streams and non-streamed; {aborted + left} expected) and, after the "
          f"run, {running:.0f} running")
    cache_growth = (cache_after - cache_before) / 2**20
    growth = (rss_after - rss_before) / 1024 - cache_growth
    print(f"KV cache usage after the run: {kv}; server RSS {rss_start / 1024:.0f} MB at start, "
          f"{rss_before / 1024:.0f} MB after the warm-up, {rss_after / 1024:.0f} MB after the measured pass, of "
          f"which the encoder cache grew {cache_growth:.0f} MB: {growth:+.0f} MB otherwise "
          f"({100 * growth * 1024 / rss_before:+.1f}%, at most +10%)")
    ok = (stats["good_ok"] == good and stats["bad_ok"] == bad and fivexx == 0 and kv == 0.0 and running == 0.0
          and stats["left"] == left and counted == aborted + left and growth * 1024 < rss_before * 0.10)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
