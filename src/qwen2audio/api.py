"""The public model object: load a checkpoint, run the network on a processor Batch.

Owns device/dtype choice and the glue between Processor batches (left padded) and the model's
flattened token layout. Generation (engine) builds on this; front ends use only this API.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from qwen2audio.config import GenerationConfig, ModelConfig
from qwen2audio.engine.core import Engine
from qwen2audio.engine.options import EngineOptions
from qwen2audio.engine.request import Prompt, SamplingError, SamplingParams
from qwen2audio.errors import AdapterNotFoundError, CheckpointError, InputError
from qwen2audio.hub import checkpoint_identity, resolve_adapter, resolve_checkpoint
from qwen2audio.model import quant, quant_cuda
from qwen2audio.model.attention import AttentionMetadata, kv_cache_dtype
from qwen2audio.model.backend import choose_backend, prepare_network
from qwen2audio.model.inputs import Chunk, flatten
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwen2audio.model.weights import load_weights
from qwen2audio.processor import Batch, Processor, as_batch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" picks the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, quantized: bool = False) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (the family overflows in fp16) and float32 on CPU, except that
    quantized weights compute in bfloat16 on a CPU with native bfloat16 instructions (AVX512-BF16
    or AMX): their kernels read bfloat16 scales, and a decode step there is bound by bytes."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        if device.type == "cpu" and quantized and _native_bf16():
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported: use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def _native_bf16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def parse_quantization(value: str | quant.QuantConfig | None, group_size: int | None = None
                       ) -> quant.QuantConfig | None:
    """``"int8"``, ``"int4"`` (with a group size of 32, 64 or 128) or ``"fp8"`` -> its QuantConfig;
    None: float."""
    try:
        return quant.parse(value, group_size)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _meta_network(config: ModelConfig, backend: Any, dtype: torch.dtype, scheme: quant.QuantConfig | None
                  ) -> Qwen2AudioForConditionalGeneration:
    """The network on the meta device in ``dtype``, its decoder's linear layers quantized ones if asked."""
    with torch.device("meta"):
        network = Qwen2AudioForConditionalGeneration(config, backend)
    network = network.to(dtype=dtype)
    if scheme is not None:
        try:
            quant.check_fits(network, scheme)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        swapped = quant.quantize_layers(network, scheme, dtype)
        logger.info("%d decoder layers stored as %s", swapped, scheme.describe())
    return network


def _check_device(scheme: quant.QuantConfig | None, device: torch.device) -> None:
    problem = scheme and quant_cuda.device_problem(scheme.scheme, device)
    if problem:
        raise InputError(problem)


def resolve_quantization(requested: quant.QuantConfig | None, config: ModelConfig) -> quant.QuantConfig | None:
    """The weight scheme to load with (None: float), from the request and the checkpoint's own."""
    saved = quant.saved_config(config.quantization)
    try:
        return quant.choose(requested, saved)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@dataclass
class Completion:
    """A finished generation. ``token_ids`` include the end-of-sequence token when one stopped it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class TextDelta(str):
    """A piece of streamed text; the last one of a stream carries ``finish_reason``."""

    finish_reason: str | None = None

    def __new__(cls, text: str, finish_reason: str | None = None) -> TextDelta:
        delta = super().__new__(cls, text)
        delta.finish_reason = finish_reason
        return delta


SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class Qwen2Audio:
    """A loaded Qwen2-Audio checkpoint with its processor and (created on first use) its engine."""

    def __init__(self, network: Qwen2AudioForConditionalGeneration, processor: Processor,
                 generation: GenerationConfig | None = None, engine_options: EngineOptions | None = None,
                 identity: str = "unnamed") -> None:
        self.network = network
        self.identity = identity  # what the weights are (see hub.checkpoint_identity)
        self.processor = processor
        self.config: ModelConfig = network.config
        self.generation = generation or GenerationConfig(frozenset({processor.tokenizer.eos_id}))
        self.engine_options = engine_options or EngineOptions()
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine every generation runs on, built on first use (it allocates the KV cache)."""
        if self._engine is None:
            self._engine = self.new_engine(self.engine_options)
        return self._engine

    def new_engine(self, options: EngineOptions | None = None) -> Engine:
        """Another engine over the same weights (its own KV cache), e.g. with other capacity options."""
        return Engine(self.network, self.processor.tokenizer, self.processor.feature_extractor, self.generation,
                      options or self.engine_options)

    def load_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Load a LoRA adapter (PEFT's format: a directory or hub id) beside the base weights, for
        ``chat(..., adapter=name)`` and the rest; ``name`` defaults to the directory's name."""
        name = name or pathlib.Path(path).name
        self.engine.load_adapter(resolve_adapter(path), name)
        return name

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    @property
    def adapters(self) -> list[str]:
        return [loaded.name for loaded in self.engine.adapters]

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, adapter: str | None = None,
             params: SamplingParams | None = None, **sampling: Any) -> Completion | Iterator[TextDelta]:
        """One reply to a conversation; ``stream=True`` yields text deltas as they are decoded;
        ``adapter``: a loaded LoRA adapter's name answers instead of the base model."""
        return self._submit(self.processor.prepare(messages), _params(params, sampling), stream, adapter)

    def complete(self, prompt: str, audios: Sequence[Any] = (), *, stream: bool = False, adapter: str | None = None,
                 params: SamplingParams | None = None, **sampling: Any) -> Completion | Iterator[TextDelta]:
        """A raw (base-model) prompt whose <|AUDIO|> placeholders take ``audios`` in order."""
        prepared = self.processor.prepare_many([prompt], audios)[0]
        return self._submit(prepared, _params(params, sampling), stream, adapter)

    def _submit(self, prompt: Prompt, params: SamplingParams, stream: bool, adapter: str | None
                ) -> Completion | Iterator[TextDelta]:
        request_id = self.engine.add_request(replace(prompt, adapter=adapter), params)
        if stream:
            return self._stream(request_id)
        return self._collect([request_id])[0]

    def generate(self, inputs: Any, audios: Sequence[Any] | None = None, *, adapter: str | None = None,
                 params: SamplingParams | None = None, **sampling: Any) -> list[Completion]:
        """Replies for many conversations or raw prompts at once (continuous batching); ``adapter``
        for all of them (per prompt: ``generate_prepared`` with ``Prompt.adapter`` set)."""
        prompts = self.processor.prepare_many(as_batch(inputs), audios)
        return self.generate_prepared([replace(p, adapter=adapter) for p in prompts], params=params, **sampling)

    def generate_prepared(self, prompts: Sequence[Prompt], *, params: SamplingParams | None = None,
                          **sampling: Any) -> list[Completion]:
        """Replies for prompts already made by ``processor.prepare`` (e.g. in another process, as the
        CPU stage of a Ray batch job does). If one fails, none is left running."""
        sampling_params = _params(params, sampling)
        ids = []
        try:
            for prompt in prompts:
                ids.append(self.engine.add_request(prompt, sampling_params))
            return self._collect(ids)
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise

    def _collect(self, request_ids: list[str]) -> list[Completion]:
        parts: dict[str, list[str]] = {i: [] for i in request_ids}
        tokens: dict[str, list[int]] = {i: [] for i in request_ids}
        logprobs: dict[str, list] = {i: [] for i in request_ids}
        done: dict[str, Completion] = {}
        for output in self.engine.run(set(request_ids)):
            parts[output.request_id].append(output.delta)
            tokens[output.request_id].extend(output.token_ids)
            logprobs[output.request_id].extend(output.logprobs)
            if output.finished:
                if output.error:
                    raise RuntimeError(f"generation failed: {output.error}")
                done[output.request_id] = Completion(
                    "".join(parts[output.request_id]), tokens[output.request_id], output.finish_reason,
                    output.prompt_tokens, output.completion_tokens, logprobs[output.request_id],
                )
        return [done[i] for i in request_ids]

    def _stream(self, request_id: str) -> Iterator[TextDelta]:
        for output in self.engine.run({request_id}):
            if output.error:
                raise RuntimeError(f"generation failed: {output.error}")
            if output.delta or output.finished:
                yield TextDelta(output.delta, output.finish_reason if output.finished else None)

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        engine_options: EngineOptions | None = None,
        quantization: str | quant.QuantConfig | None = None,
        quantization_group_size: int | None = None,
        **processor_options: Any,
    ) -> Qwen2Audio:
        """Load from a local directory or a Hugging Face hub id (downloaded with huggingface_hub).

        The network is built on the meta device, allocated once on ``device`` in ``dtype`` and
        filled tensor by tensor, so host memory peaks near one copy of the weights. Its op backend
        (``engine_options.kernels``, ``cpu_onednn``) is chosen here, once, and bound to its layers.

        ``quantization`` ("int8", "int4" with ``quantization_group_size`` 32/64/128, default 128, or
        on GPUs of compute capability 8.9+ "fp8") stores the decoder's linear layers as codes,
        quantized tensor by tensor while loading, so the float model never exists in memory; a checkpoint written by
        ``qwen2audio quantize`` loads as it was saved (docs/quantization.md).
        """
        target = resolve_device(device)
        options = engine_options or EngineOptions()
        requested = parse_quantization(quantization, quantization_group_size)  # before any download
        _check_device(requested, target)
        directory = resolve_checkpoint(name_or_path, allow_patterns=WEIGHT_PATTERNS)
        config = ModelConfig.from_dir(directory)
        scheme = resolve_quantization(requested, config)
        _check_device(scheme, target)
        torch_dtype = resolve_dtype(dtype, target, quantized=scheme is not None)
        started = time.perf_counter()
        onednn = options.cpu_onednn and not options.compile_decode  # the compiler takes plain layers
        backend = choose_backend(config.text, target, torch_dtype, options.kernels, onednn,
                                 kv_cache_dtype(options.kv_cache_dtype, torch_dtype))
        network = _meta_network(config, backend, torch_dtype, scheme).to_empty(device=target)
        network.eval().requires_grad_(False)
        load_weights(network, directory, progress=progress)
        prepare_network(network)
        logger.info("loaded %s in %.1f s (%s, %s, %s)", directory, time.perf_counter() - started, target, torch_dtype,
                    backend.name)
        if options.max_model_len is not None:  # the processor refuses over-long prompts first
            limit = min(options.max_model_len, config.text.max_position_embeddings)
            processor_options["max_context"] = min(processor_options.get("max_context") or limit, limit)
        processor = Processor.from_pretrained(directory, **processor_options)
        if processor.audio_id != config.audio_token_id:
            raise CheckpointError(
                f"{directory}: tokenizer's <|AUDIO|> id {processor.audio_id} != config's {config.audio_token_id}"
            )
        generation = GenerationConfig.from_dir(directory, processor.tokenizer.eos_id)
        identity = checkpoint_identity(name_or_path, directory, requested.label() if requested else None)
        return cls(network, processor, generation, options, identity)

    @torch.inference_mode()
    def logits(self, batch: Batch, adapter: str | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) for a left-padded processor batch; pad positions are zero;
        ``adapter``: through a loaded LoRA adapter.

        Positions count from each row's first real token, as the reference's generate does.
        """
        device = self.device
        with self._whole_batch_adapter(adapter, batch):
            clips = self._clip_embeddings(batch)
            chunks = [Chunk(ids, 0, [(span.offset, next(clips)) for span in spans])
                      for ids, spans in zip(batch.token_ids, batch.audio_spans, strict=True)]
            inputs = flatten(chunks, device)
            meta = AttentionMetadata.prefill(inputs.query_lens)
            hidden = self.network(inputs.input_ids, inputs.positions, meta, None, inputs.audio_embeds,
                                  inputs.audio_index)
            flat = self.network.logits(hidden)  # [N, vocab]
        width = batch.input_ids.shape[1]
        out = torch.zeros(len(chunks), width, flat.shape[-1], dtype=flat.dtype, device=device)
        for row, (rows, n) in enumerate(zip(flat.split(inputs.query_lens), inputs.query_lens, strict=True)):
            out[row, width - n:] = rows
        return out

    @contextmanager
    def _whole_batch_adapter(self, adapter: str | None, batch: Batch) -> Iterator[None]:
        """Every row of every part of the network through ``adapter``'s slot (None: the base model)."""
        if adapter is None:
            yield
            return
        lora = self.engine.runner.lora
        if lora is None:
            raise AdapterNotFoundError(f"no adapter named {adapter!r} is loaded (none is)")
        loaded = lora.acquire(adapter)
        counts = {"decoder": sum(len(ids) for ids in batch.token_ids), "encoder": len(batch.window_tokens),
                  "projector": sum(batch.window_tokens)}
        counts["head"] = counts["decoder"]
        try:
            with lora.context.using(groups={kind: [(loaded.slot, torch.arange(n, device=self.device))]
                                            for kind, n in counts.items()}):
                yield
        finally:
            lora.release(loaded)

    def _clip_embeddings(self, batch: Batch) -> Iterator[torch.Tensor]:
        """Each clip's projected audio embeddings [tokens, hidden], in the batch's clip order."""
        if not batch.window_tokens:
            return iter(())
        device = self.device
        rows = self.network.encode_audio(batch.input_features.to(device), batch.feature_attention_mask.to(device),
                                         batch.window_tokens)
        return iter(rows.split([span.length for spans in batch.audio_spans for span in spans]))


def _params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise SamplingError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    if params is not None and sampling:
        raise SamplingError("pass either params=SamplingParams(...) or keyword arguments, not both")
    return params or SamplingParams(**sampling)
