"""The engine: step() = schedule -> run -> sample -> update; a synchronous and an async front.

Owns request bookkeeping (add, abort, finish, prefix-cache publishing) and turning sampled tokens
into RequestOutputs. Every front end (Python API, CLI, server) goes through this class.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qwen2audio.engine.kv_cache import BlockManager, block_hashes, token_keys
from qwen2audio.engine.request import Request, RequestOutput, SamplingParams
from qwen2audio.engine.runner import ModelRunner
from qwen2audio.engine.sampler import Sampler
from qwen2audio.engine.scheduler import ScheduledStep, Scheduler
from qwen2audio.errors import PromptError
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwen2audio.processor import Processor, Prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """Capacity knobs; None picks from the device (see runner.default_kv_budget)."""

    block_size: int = 16
    kv_cache_bytes: int | None = None
    max_batch_tokens: int = 16384
    max_running: int = 256
    enable_prefix_cache: bool = True
    encoder_cache_bytes: int = 512 * 2**20
    seed: int = 0
    cpu_onednn: bool = True  # oneDNN linear layers on the CPU (False: plain torch.nn.Linear)
    kernels: bool | None = None  # Triton kernels (None: on CUDA when triton is installed)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    max_graph_batch: int = 128  # decode steps of up to this many sequences replay a CUDA graph
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8" (e4m3: half the KV bytes)
    async_decode: bool | None = None  # launch decode step n+1 before reading step n (None: with CUDA graphs)


def generation_defaults(directory: pathlib.Path | None, processor: Processor) -> tuple[dict[str, Any], frozenset[int]]:
    """Sampling defaults and end-of-sequence ids from generation_config.json (eos from the tokenizer
    when the file has none)."""
    config: dict[str, Any] = {}
    path = pathlib.Path(directory) / "generation_config.json" if directory else None
    if path is not None and path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    defaults = {name: config.get(name) for name in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                    "repetition_penalty")}
    if not config.get("do_sample", False):
        defaults["temperature"] = 0.0
    eos = config.get("eos_token_id", processor.tokenizer.eos_id)
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    return defaults, eos_ids


@dataclass
class _Inflight:
    """A decode step launched but not read yet."""

    requests: list[Request]
    tokens: torch.Tensor  # [S] sampled, on the device
    host: torch.Tensor  # [S] pinned; an asynchronous copy of tokens
    done: torch.cuda.Event | None  # recorded after that copy (None on the CPU, where copies are synchronous)


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: one thread calls step()."""

    def __init__(
        self,
        network: Qwen2AudioForConditionalGeneration,
        processor: Processor,
        directory: pathlib.Path | None = None,
        options: EngineOptions = EngineOptions(),
    ) -> None:
        self.processor = processor
        self.options = options
        self.runner = ModelRunner(
            network, processor.feature_extractor, block_size=options.block_size,
            kv_cache_bytes=options.kv_cache_bytes, encoder_cache_bytes=options.encoder_cache_bytes,
            cpu_onednn=options.cpu_onednn, kernels=options.kernels, enforce_eager=options.enforce_eager,
            max_graph_batch=min(options.max_graph_batch, options.max_running),
            max_batch_tokens=options.max_batch_tokens, max_running=options.max_running,
            kv_cache_dtype=options.kv_cache_dtype,
        )
        self.blocks = BlockManager(self.runner.num_blocks, options.block_size, options.enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, self._hashes, options.max_batch_tokens, options.max_running)
        self.sampler = Sampler(self.runner.device, options.seed)
        self.defaults, self.eos_ids = generation_defaults(directory, processor)
        self.max_context = network.config.text.max_position_embeddings
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.driven_by: object | None = None  # the AsyncEngine stepping this engine, if any
        self.pipelined = (options.async_decode if options.async_decode is not None
                          else self.runner.static is not None and self.runner.device.type == "cuda")
        self._inflight: _Inflight | None = None

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a prepared prompt; returns its id. Bad parameters or an over-long prompt raise here."""
        params = (params or SamplingParams()).with_defaults(self.defaults)
        if prompt.num_tokens >= self.max_context:
            raise PromptError(f"the prompt is {prompt.num_tokens} tokens; the model's context is {self.max_context}")
        request = Request(
            prompt, params, self.processor.tokenizer.detokenizer(params.stop, params.skip_special_tokens),
            self.eos_ids, min(prompt.num_tokens + params.max_new_tokens, self.max_context),
        )
        if request_id is not None:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            request.request_id = request_id
        while request.request_id in self.requests:  # a caller may have taken a generated name
            request.request_id = Request.new_id()
        self.scheduler.add(request)
        self.requests[request.request_id] = request
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it was not running or waiting."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request)
        self.sampler.forget(request_id)
        request.finish_reason = request.finish_reason or "abort"
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; report what each scheduled request produced.

        Pipelined decoding (``async_decode``): a decode-only step is launched and left running; the
        next call launches the step after it, whose input tokens are still on the device, before
        reading this one, so the host's bookkeeping overlaps the GPU's work and the decode loop never
        waits on the device except for tokens a step already finished. Outputs arrive one call later.
        """
        if self._inflight is not None:
            return self._advance()
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if scheduled.empty:
            return []
        if not scheduled.prefills and self._pipelinable(scheduled.decodes):
            try:
                self._inflight = self._launch(scheduled.decodes, ahead=0, tokens=None)
            except Exception as exc:  # after sampling: redoing the step would skew seeds and penalties
                logger.exception("pipelined decode step failed after sampling")
                return [self._fail(r, f"{type(exc).__name__}: {exc}") for r in scheduled.decodes]
            if self._inflight is not None:
                return []
        try:
            return self._run(scheduled)
        except Exception:  # a failing batch must not take the engine (or its other requests) down
            logger.exception("step failed; running its requests one by one to find the failing ones")
        outputs = []
        for request in [*scheduled.prefills, *scheduled.decodes]:
            alone = ScheduledStep(prefills=[request] if request in scheduled.prefills else [],
                                  decodes=[request] if request in scheduled.decodes else [])
            try:
                outputs.extend(self._run(alone))
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                outputs.append(self._fail(request, f"{type(exc).__name__}: {exc}"))
        return outputs

    def _run(self, scheduled: ScheduledStep) -> list[RequestOutput]:
        requests = [*scheduled.prefills, *scheduled.decodes]
        logits = self.runner.execute(scheduled)
        result = self.sampler.sample(logits, requests)
        return [self._commit(request, token, logprob, prefill=index < len(scheduled.prefills))
                for index, (request, token, logprob) in enumerate(
                    zip(requests, result.tokens, result.logprobs, strict=True))]

    def _commit(self, request: Request, token: int, logprob: dict | None, prefill: bool) -> RequestOutput:
        """Record a token the model produced for ``request`` (all its earlier tokens are now computed)."""
        request.num_computed = request.num_tokens
        if prefill:
            full = request.num_computed // self.blocks.block_size
            self.blocks.publish(request.table, self._hashes(request)[:full])
        delta = request.append(token)
        if logprob is not None:
            request.logprobs.append(logprob)
        if request.finish_reason is not None:
            self._retire(request)
        return self._output(request, delta, [token], [logprob] if logprob else [])

    # -- pipelined decoding ------------------------------------------------------------------------

    def _pipelinable(self, requests: list[Request]) -> bool:
        """Decode steps through the static decoder can run ahead, unless a request wants logprobs
        (they are read on the host every step)."""
        static = self.runner.static
        return (self.pipelined and static is not None and bool(requests) and static.bucket(len(requests)) is not None
                and all(r.params.logprobs is None for r in requests))

    def _launch(self, requests: list[Request], ahead: int, tokens: torch.Tensor | None) -> _Inflight | None:
        """Run a decode step and sample it, leaving the tokens on the device. None if the model step
        failed, when nothing has changed and the plain path can run it; a failure after sampling
        (which moves seeded generators and penalty state) raises."""
        try:
            logits = self.runner.execute_decode(requests, ahead, tokens)
        except Exception:
            logger.exception("pipelined decode step failed; running it the plain way")
            return None
        sampled = self.sampler.sample_on_device(logits, requests, lag=ahead)
        return _Inflight(list(requests), sampled, *self.runner.static.read_back(sampled))

    def _advance(self) -> list[RequestOutput]:
        """Launch the step after the one in flight (if it can run ahead), then read the one in flight."""
        current, self._inflight = self._inflight, None
        following = [r for r in current.requests if self._continues(r)]
        failed: Exception | None = None
        # Grown first: the admission check must see the blocks these decodes take.
        if (following and self._pipelinable(following) and self._grow(following)
                and not self.scheduler.can_admit(len(following))):
            tokens = current.tokens
            if len(following) < len(current.requests):
                rows = {id(r): k for k, r in enumerate(current.requests)}
                tokens = tokens.index_select(0, self.sampler.to_device([rows[id(r)] for r in following], torch.long))
            try:
                self._inflight = self._launch(following, ahead=1, tokens=tokens)
            except Exception as exc:  # after sampling: see step()
                logger.exception("pipelined decode step failed after sampling")
                failed = exc
        outputs = self._collect(current)
        if failed is not None:
            outputs += [self._fail(r, f"{type(failed).__name__}: {failed}") for r in following
                        if self.requests.get(r.request_id) is r]
        return outputs

    def _continues(self, request: Request) -> bool:
        """Still running after the token in flight, unless that token is an end token or a stop string."""
        return (self.requests.get(request.request_id) is request and request.finish_reason is None
                and not request.length_reached(pending=1))

    def _grow(self, requests: list[Request]) -> bool:
        """A cache slot for each request's token after the one in flight; False if one is short
        (the plain path then schedules, preempting if it must)."""
        for request in requests:
            if not self.blocks.can_grow(request.table, request.num_tokens + 1):
                return False
            self.blocks.grow(request.table, request.num_tokens + 1)
        return True

    def _collect(self, step: _Inflight) -> list[RequestOutput]:
        if step.done is not None:
            step.done.synchronize()
        outputs = []
        for request, token in zip(step.requests, step.host.tolist(), strict=True):
            if self.requests.get(request.request_id) is not request or request.finish_reason is not None:
                continue  # aborted, or finished by the token before, while this step ran
            try:
                outputs.append(self._commit(request, token, None, prefill=False))
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                outputs.append(self._fail(request, f"{type(exc).__name__}: {exc}"))
        return outputs

    def _hashes(self, request: Request) -> list[bytes]:
        """Block hashes of the request's tokens, kept until it grows: a request waiting at the head
        of the queue is asked for them at every step."""
        cached = request.hash_cache
        if cached is not None and cached[0] == request.num_tokens:
            return cached[1]
        prompt = request.prompt
        spans = list(zip(prompt.offsets, prompt.lengths, prompt.digests, strict=True))
        hashes = block_hashes(token_keys(request.all_ids, spans), self.blocks.block_size)
        request.hash_cache = (request.num_tokens, hashes)
        return hashes

    def _retire(self, request: Request) -> None:
        full = (request.num_tokens - 1) // self.blocks.block_size  # the last token's KV was never computed
        self.blocks.publish(request.table, self._hashes(request)[:full])
        self.scheduler.finish(request)
        self.sampler.forget(request.request_id)
        self.requests.pop(request.request_id, None)

    def _fail(self, request: Request, message: str) -> RequestOutput:
        request.error, request.finish_reason = message, "error"
        self.scheduler.finish(request)
        self.sampler.forget(request.request_id)
        self.requests.pop(request.request_id, None)
        return self._output(request, "", [], [])

    @staticmethod
    def _output(request: Request, delta: str, tokens: list[int], logprobs: list) -> RequestOutput:
        return RequestOutput(
            request.request_id, delta, tokens, request.finish_reason is not None, request.finish_reason,
            prompt_tokens=len(request.prompt.token_ids), completion_tokens=len(request.output_ids),
            logprobs=logprobs, error=request.error,
        )

    def run(self, request_ids: set[str]) -> Iterator[RequestOutput]:
        """Step until the given requests finish, yielding their outputs (others keep running too)."""
        if self.driven_by is not None:
            for request_id in request_ids:
                self.abort(request_id)
            raise RuntimeError("this engine is being stepped by an AsyncEngine (a server); submit through it")
        pending = set(request_ids)
        try:
            while pending:
                for output in self.step():
                    if output.request_id in pending:
                        yield output
                        if output.finished:
                            pending.discard(output.request_id)
                if pending and not self.has_unfinished:
                    raise RuntimeError(f"requests {sorted(pending)} vanished from the scheduler")
        finally:
            for request_id in pending:  # the caller stopped listening: free what they held
                self.abort(request_id)


class AsyncEngine:
    """Runs an Engine's step loop on a background thread; coroutines submit, stream and abort.

    All engine calls happen on the loop thread: submissions and aborts travel through a queue.
    """

    def __init__(self, engine: Engine) -> None:
        if getattr(engine, "driven_by", None) is not None:
            raise RuntimeError("this engine already has an AsyncEngine stepping it; one per engine")
        engine.driven_by = self
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="qwen2audio-engine", daemon=True)
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or cancellation) aborts it."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        self._commands.put(("add", prompt, params, request_id, loop, stream, accepted))
        request_id = await accepted  # raises the engine's validation error, if any
        finished = False
        try:
            while not finished:
                output = await stream.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self.engine.driven_by = None

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    with torch.inference_mode():
                        outputs = self.engine.step()
                    for output in outputs:
                        self._deliver(output.request_id, output, final=output.finished)
        except BaseException as exc:  # reported to every waiting stream, then re-raised
            self.error = exc
            logger.exception("engine loop died")
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine failed: {exc}"), final=True)
            raise

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, prompt, params, request_id, loop, stream, accepted = command
            try:
                request_id = self.engine.add_request(prompt, params, request_id)
            except Exception as exc:  # validation errors go back to the caller
                loop.call_soon_threadsafe(_resolve, accepted, None, exc)
                return
            self._streams[request_id] = (loop, stream)
            loop.call_soon_threadsafe(_resolve, accepted, request_id, None)
        elif command[0] == "abort":
            self.engine.abort(command[1])
            self._streams.pop(command[1], None)

    def _deliver(self, request_id: str, item: Any, final: bool) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        if final:
            self._streams.pop(request_id, None)
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, item)


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
