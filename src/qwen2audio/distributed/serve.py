"""Engine replicas on Ray Serve behind one OpenAI-compatible front.

Owns the two deployments and what joins them: the front (the same FastAPI app as ``qwen2audio
serve``, holding the processor and config but no weights) and N engine replicas (a model and its
AsyncEngine each, routed by Serve's load-aware router); the client that streams a request from a
replica and sends it to another if its replica died before it started; the board where replicas
post their queue and KV figures so the front's /metrics covers them all. Replacing dead replicas,
routing and queueing are Ray Serve's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from qwen2audio.engine.core import check_request
from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.engine.scheduler import EngineStats
from qwen2audio.errors import AdapterError, AdapterNotFoundError, InputError

logger = logging.getLogger(__name__)

APP_NAME = "qwen2audio"
REPORT_S = 0.5  # how often a replica posts its queue and KV figures
STALE_S = 5.0  # a replica silent this long (dead, or being replaced) drops out of the sums
RETRIES = 2  # a request whose replica died before its first output goes to another this often


def require_serve() -> Any:
    """The ``ray.serve`` module, or one error naming the extra that brings it."""
    try:
        from ray import serve
    except ImportError:
        raise InputError('--replicas needs Ray Serve, which is not installed: pip install "qwen2audio[ray]"') from None
    return serve


# ----- the engine replicas --------------------------------------------------------------------


class StatsBoard:
    """A small Ray actor (owned by the front): each replica's latest EngineStats, posted every
    :data:`REPORT_S`; the front reads the fresh ones."""

    def __init__(self) -> None:
        self.posts: dict[str, tuple[float, dict[str, int]]] = {}

    def post(self, replica: str, stats: dict[str, int]) -> None:
        self.posts[replica] = (time.monotonic(), stats)

    def read(self) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        return {replica: stats for replica, (at, stats) in self.posts.items() if now - at < STALE_S}


class EngineReplica:
    """One engine replica (a Serve deployment): ``Qwen2Audio.from_pretrained(model, **load)`` and
    an AsyncEngine over it. Streams a prepared prompt's outputs; leaving early aborts the request."""

    async def __init__(self, model: str, load: dict[str, Any], board: str) -> None:
        from ray import serve

        from qwen2audio import EngineOptions, Qwen2Audio
        from qwen2audio.engine.async_engine import AsyncEngine

        settings = dict(load)
        options = EngineOptions(**settings.pop("engine_options", {}))
        self.model = await asyncio.to_thread(Qwen2Audio.from_pretrained, model, progress=False,
                                             engine_options=options, **settings)
        self.engine = AsyncEngine(self.model.engine)
        self.name = serve.get_replica_context().replica_id.unique_id
        self.board = board
        self.reporter = asyncio.get_running_loop().create_task(self._report())

    def limits(self) -> dict[str, int]:
        return {"max_context": self.engine.max_context, "vocab_size": self.model.config.text.vocab_size}

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        async for output in self.engine.generate(prompt, params):
            yield output

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"the engine thread stopped: {self.engine.error}")

    async def _report(self) -> None:
        import ray

        while True:
            try:
                board = ray.get_actor(self.board)
                await board.post.remote(self.name, dataclasses.asdict(self.engine.stats))
            except Exception as exc:  # the front (and its board) may be starting or being replaced
                logger.debug("stats not posted: %s", exc)
            await asyncio.sleep(REPORT_S)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ----- the front ----------------------------------------------------------------------------


class RemoteEngine:
    """The AsyncEngine interface (generate, check, max_context, stats, alive, shutdown) over the
    engine deployment's handle, for the server app."""

    alive = True  # Serve health-checks and replaces replicas; the front answers while any can

    def __init__(self, handle: Any, limits: dict[str, int]) -> None:
        self.handle = handle.options(stream=True)  # made once: its router's load figures serve every request
        self.max_context = limits["max_context"]
        self.vocab_size = limits["vocab_size"]
        self.stats = EngineStats()
        self.replicas = 0
        self.adapters: list = []  # LoRA adapters are served by a single engine (serve without --replicas)

    def check(self, prompt: Prompt, params: SamplingParams) -> None:
        check_request(prompt, params, self.max_context, self.vocab_size)

    async def load_adapter(self, path: str, name: str) -> None:
        raise AdapterError("LoRA adapters are not served by Ray replicas yet: serve them without --replicas")

    def unload_adapter(self, name: str) -> None:
        raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (Ray replicas serve none)")

    def shutdown(self) -> None:
        """Nothing to stop here: the replicas are Serve's."""

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """A request's outputs from whichever replica the router picks. A replica that dies before the
        first output: the request goes to another; after it: one last output with the error."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(RETRIES + 1):
            response = self.handle.generate.remote(prompt, params or SamplingParams())
            started = finished = False
            try:
                async for output in response:
                    started, finished = True, output.finished
                    yield output
                return
            except (RayActorError, ActorUnavailableError) as exc:
                if started or attempt == RETRIES:
                    yield RequestOutput(request_id or "", "", [], True, "error",
                                        error=f"the engine replica serving this request stopped ({type(exc).__name__})")
                    return
                logger.warning("an engine replica died before starting a request; sending it to another (%s)", exc)
            finally:
                if not finished:
                    response.cancel()

    def take(self, posts: dict[str, dict[str, int]]) -> None:
        """The sum of the replicas' fresh figures becomes ``stats`` (what /metrics' gauges read)."""
        total = EngineStats(kv_blocks=0, kv_blocks_free=0)
        for stats in posts.values():
            total = EngineStats(**{name: getattr(total, name) + value for name, value in stats.items()})
        self.stats = total if posts else EngineStats()
        self.replicas = len(posts)


@dataclass
class FrontModel:
    """What the server app reads of a model when its engines run elsewhere."""

    processor: Any
    config: Any


class Front:
    """The ingress deployment: the server app over a :class:`RemoteEngine`. ``max_context`` and the
    vocabulary come from a replica, so the front refuses what the replicas would."""

    async def __init__(self, engines: Any, model: str, options: Any, processor_options: dict[str, Any],
                       board: str) -> None:
        import ray

        from qwen2audio.config import ModelConfig
        from qwen2audio.hub import PROCESSOR_FILES, resolve_checkpoint
        from qwen2audio.processor import Processor

        self.board = ray.remote(StatsBoard).options(name=board, get_if_exists=True, num_cpus=0).remote()
        self.engine = RemoteEngine(engines, await engines.limits.remote())
        directory = resolve_checkpoint(model, allow_patterns=PROCESSOR_FILES)
        processor = Processor.from_pretrained(directory, **{**processor_options,
                                                            "max_context": self.engine.max_context})
        self.model = FrontModel(processor, ModelConfig.from_dir(directory))
        self.options = options
        self.poller = asyncio.get_running_loop().create_task(self._poll())

    def __serve_build_asgi_app__(self) -> Any:
        from qwen2audio.server.app import create_app

        return create_app(self.model, self.options, engine=self.engine)  # type: ignore[arg-type]

    async def _poll(self) -> None:
        while True:
            try:
                self.engine.take(await self.board.read.remote())
            except Exception as exc:
                logger.debug("stats not read: %s", exc)
            await asyncio.sleep(REPORT_S)


def build_app(model: str, options: Any, *, replicas: int, load: dict[str, Any],
              processor_options: dict[str, Any] | None = None, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, max_ongoing_requests: int = 256, name: str = APP_NAME) -> Any:
    """The Serve application: ``serve.run(build_app(...), name=name, route_prefix="/")``.

    ``load``: each replica's :meth:`Qwen2Audio.from_pretrained` keywords (``engine_options`` as a
    dict); ``max_ongoing_requests``: what one replica takes at once (more wait in Serve's router
    and go to whichever replica frees first, or survives)."""
    serve = require_serve()
    board = f"qwen2audio-stats-{name}"
    engines = serve.deployment(EngineReplica, name="Qwen2AudioEngine", num_replicas=replicas,
                               max_ongoing_requests=max_ongoing_requests,
                               ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    front = serve.deployment(serve.ingress()(Front), name="Qwen2AudioFront", num_replicas=1,
                             max_ongoing_requests=max(options.max_pending * 4, 1000),
                             ray_actor_options={"num_cpus": 0})
    return front.bind(engines.bind(model, load, board), model, options, processor_options or {}, board)
