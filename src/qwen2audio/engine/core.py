"""The engine: step() = schedule -> execute -> sample -> update, over continuous batches.

Owns the four parts and the order they run in; each part owns its state (the scheduler a request's
life and the KV blocks, the runner the network and the cache tensors, the sampler the random
generators, the pipeline the step in flight). Every front end (Python API, CLI, server) goes
through this class, directly or through engine/async_engine.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace

import torch

from qwen2audio.audio.features import FeatureExtractor
from qwen2audio.config import GenerationConfig
from qwen2audio.engine.block_manager import BlockManager
from qwen2audio.engine.options import EngineOptions
from qwen2audio.engine.pipeline import DecodePipeline
from qwen2audio.engine.request import Prompt, Request, RequestOutput, SamplingError, SamplingParams
from qwen2audio.engine.runner import ModelRunner
from qwen2audio.engine.sampler import Sampler
from qwen2audio.engine.scheduler import EngineStats, ScheduledStep, Scheduler
from qwen2audio.errors import AdapterNotFoundError, PromptError
from qwen2audio.model.lora import Loaded, LoraManager, adapter_rank
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwen2audio.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: one thread calls step()."""

    def __init__(
        self,
        network: Qwen2AudioForConditionalGeneration,
        tokenizer: Tokenizer,
        features: FeatureExtractor,
        generation: GenerationConfig | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        options = options or EngineOptions()
        if options.kernels and not network.backend.kernels:
            raise ValueError(f"kernels=True, but this network was loaded with the {network.backend.name} backend; "
                             "choose the kernels when loading (Qwen2Audio.from_pretrained(engine_options=...))")
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig(frozenset({tokenizer.eos_id}))
        self.options = options
        self.vocab_size = network.config.text.vocab_size
        self.max_context = min(network.config.text.max_position_embeddings, options.max_model_len or 2**62)
        self.runner = ModelRunner(network, features, options)
        blocks = BlockManager(self.runner.num_blocks, options.block_size, options.enable_prefix_cache)
        self.scheduler = Scheduler(blocks, options.max_batch_tokens, options.max_running)
        self.sampler = Sampler(self.runner.device, options.seed)
        pipelined = options.async_decode if options.async_decode is not None else self.runner.device.type == "cuda"
        self.pipeline = DecodePipeline(self.runner, self.sampler, self.scheduler, pipelined)
        self.driven_by: object | None = None  # the AsyncEngine stepping this engine, if any
        self._holding: dict[str, Request] = {}  # live requests that hold a LoRA adapter, by id

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a prepared prompt; returns its id. An over-long prompt or one that can never fit raises here."""
        params = (params or SamplingParams()).with_defaults(self.generation)
        self.check(prompt, params)
        request = Request(
            prompt, params, self.tokenizer.detokenizer(params.stop, params.skip_special_tokens),
            self.generation.eos_token_ids, min(prompt.num_tokens + params.max_new_tokens, self.max_context),
        )
        if request_id is not None:
            request.request_id = request_id
        else:
            while request.request_id in self.scheduler.requests:  # a caller may have taken a generated name
                request.request_id = Request.new_id()
        if prompt.adapter is not None:  # held before queueing: an unload in between cannot leave it running
            request.adapter = self.runner.lora.acquire(prompt.adapter)
        try:
            self.scheduler.add(request)
        except BaseException:
            if request.adapter is not None:
                self.runner.lora.release(request.adapter)
            raise
        if request.adapter is not None:
            self._holding[request.request_id] = request
        return request.request_id

    def check(self, prompt: Prompt, params: SamplingParams) -> None:
        """Raise what add_request would for this pair (a front end asks before it answers 200)."""
        check_request(prompt, params, self.max_context, self.vocab_size)
        if prompt.adapter is not None:
            self._slots(prompt.adapter).find(prompt.adapter)

    def load_adapter(self, path: str | os.PathLike, name: str) -> Loaded:
        """Load a PEFT LoRA adapter under ``name`` (requests then name it in ``Prompt.adapter``).
        An engine built without slots (max_loras=0) makes 4 of rank up to max(16, the adapter's),
        after its KV cache took its memory: on a GPU, build it with ``max_loras`` instead."""
        lora = self.runner.lora
        if lora is None:
            rank = max(self.options.max_lora_rank, adapter_rank(path))
            lora = self.runner.enable_lora(4, rank)
        return lora.load(path, name)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter: new requests cannot name it; running ones finish with it."""
        self._slots(name).unload(name)

    def _slots(self, name: str) -> LoraManager:
        """The adapter slots, where an adapter called ``name`` is asked for."""
        if self.runner.lora is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (none is)")
        return self.runner.lora

    @property
    def adapters(self) -> list[Loaded]:
        return list(self.runner.lora.loaded.values()) if self.runner.lora is not None else []

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it was not running or waiting."""
        request = self.scheduler.abort(request_id)
        if request is not None:
            self.sampler.forget(request_id)
            self._release(request_id)
        return request is not None

    def _release(self, request_id: str) -> None:
        """A finished request's hold on its adapter's slot (see LoraManager.unload)."""
        request = self._holding.pop(request_id, None)
        if request is not None:
            self.runner.lora.release(request.adapter)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        return replace(self.scheduler.stats(), encoder_cache_bytes=self.runner.encoder_cache.bytes)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; report what each scheduled request produced (a pipelined step reports one call later)."""
        if self.pipeline.busy:
            return self._settle(self.pipeline.advance())
        scheduled = self.scheduler.schedule()
        outputs = self.pipeline.start(scheduled)  # None unless the step runs ahead
        return self._settle(outputs if outputs is not None else self._execute(scheduled))

    def _execute(self, scheduled: ScheduledStep) -> list[RequestOutput]:
        """A failing batch must not take the engine (or its other requests) down: it is run again
        one request at a time, and only the requests that fail alone fail."""
        if scheduled.empty:
            return []
        try:
            return self._forward(scheduled)
        except Exception:
            logger.exception("step failed; running its requests one by one to find the failing ones")
        outputs = []
        for request in scheduled.requests:
            prefill = request in scheduled.prefills
            alone = ScheduledStep(prefills=[request] if prefill else [], decodes=[] if prefill else [request])
            try:
                outputs.extend(self._forward(alone))
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                outputs.append(self.scheduler.fail(request, f"{type(exc).__name__}: {exc}"))
        return outputs

    def _forward(self, scheduled: ScheduledStep) -> list[RequestOutput]:
        logits = self.runner.execute(scheduled)
        sampled = self.sampler.sample(logits, scheduled.requests)
        return self.scheduler.update(scheduled.requests, sampled.tokens, sampled.logprobs, len(scheduled.prefills))

    def _settle(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for output in outputs:
            if output.finished:
                self.sampler.forget(output.request_id)
                self._release(output.request_id)
        return outputs

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


def check_request(prompt: Prompt, params: SamplingParams, max_context: int, vocab_size: int) -> None:
    """What an engine of this context and vocabulary refuses, asked without one (a server front
    whose engines run elsewhere asks this too)."""
    if not prompt.num_tokens:
        raise PromptError("the prompt is empty: it needs at least one token")
    if prompt.num_tokens >= max_context:
        raise PromptError(f"the prompt is {prompt.num_tokens} tokens; the model's context is {max_context}")
    outside = sorted(t for t, _ in params.logit_bias if t >= vocab_size)
    if outside:
        raise SamplingError(f"logit_bias names token ids outside the vocabulary (0-{vocab_size - 1}): {outside[:5]}")
