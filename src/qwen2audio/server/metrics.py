"""Prometheus series of one server.

Owns the registry. Request counters are labelled by route template and status code only (values
from our own route table, so clients cannot grow the series); the queue and KV gauges read the
snapshot the engine thread publishes, never the scheduler's live state from another thread.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen2audio.engine.scheduler import EngineStats

UNMATCHED = "unmatched"  # the route label of a path no route serves


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], replicas: Callable[[], int] = lambda: 1) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen2audio_requests", "finished HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen2audio_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwen2audio_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("qwen2audio_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("qwen2audio_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.aborted = Counter("qwen2audio_requests_aborted", "requests whose client left before the end",
                               registry=r)
        Gauge("qwen2audio_requests_waiting", "requests waiting", registry=r).set_function(lambda: stats().waiting)
        Gauge("qwen2audio_requests_running", "requests running", registry=r).set_function(lambda: stats().running)
        Gauge("qwen2audio_kv_cache_usage", "fraction of KV blocks in use", registry=r).set_function(
            lambda: stats().kv_usage)
        Gauge("qwen2audio_engine_replicas", "engine replicas whose figures the gauges sum (1 unless --replicas)",
              registry=r).set_function(replicas)
        Gauge("qwen2audio_encoder_cache_bytes", "bytes of cached audio embeddings (bounded, least recently "
              "used evicted)", registry=r).set_function(lambda: stats().encoder_cache_bytes)

    def count(self, route: str | None, status: int) -> None:
        self.requests.labels(route or UNMATCHED, str(int(status))).inc()

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
