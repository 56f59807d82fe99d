"""Owns the KV cache tensors and the encoder-output cache; executes one scheduled step on the network.

Turns a ScheduledStep into flattened model inputs (token ids, positions, slot mapping, block
tables), runs the audio encoder for clips not already cached, and returns the last-token logits of
every scheduled request. Decode steps go through the static decoder (fixed buffers, CUDA graphs)
where that is on. The network is used as it was loaded: its backend is read, never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from qwen2audio import heap
from qwen2audio.audio.features import FeatureExtractor
from qwen2audio.engine.compiled_decode import CompiledDecoder
from qwen2audio.engine.cuda_graphs import StaticDecoder
from qwen2audio.engine.encoder_cache import EncoderCache
from qwen2audio.engine.options import EngineOptions
from qwen2audio.engine.request import Request
from qwen2audio.engine.scheduler import ScheduledStep
from qwen2audio.model.attention import AttentionMetadata, KVCache, kv_cache_dtype
from qwen2audio.model.inputs import Chunk, flatten
from qwen2audio.model.lora import Loaded, LoraManager, grouped
from qwen2audio.model.quant import DECODE_ROWS
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration

if TYPE_CHECKING:
    from qwen2audio.audio.segment import Window

logger = logging.getLogger(__name__)
GROUPED_ROWS = 64  # steps of more rows take the adapters' products grouped by adapter (bench/lora_cpu.py)


def kv_bytes_per_block(network: Qwen2AudioForConditionalGeneration, block_size: int, dtype: torch.dtype) -> int:
    text = network.config.text
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * element


def activation_reserve(network: Qwen2AudioForConditionalGeneration, max_batch_tokens: int, max_running: int) -> int:
    """Bytes one step's activations may need beside the weights and the KV cache: the widest prefill
    (its rows through qkv, the MLP and the residual stream) or the audio windows it encodes, plus
    the logits of every running request (and the sampler's copy), with half again for slack."""
    text, audio = network.config.text, network.config.audio
    element = torch.empty((), dtype=network.dtype).element_size()
    qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    decoder = max_batch_tokens * (2 * text.hidden_size + qkv + 3 * text.intermediate_size) * element
    windows = -(-max_batch_tokens // 750) + 1
    encoder = windows * audio.max_source_positions * (audio.encoder_ffn_dim + 4 * audio.d_model) * element
    logits = 2 * max_running * text.vocab_size * 4
    return int(1.5 * (max(decoder, encoder) + logits))


def default_kv_budget(device: torch.device, per_token: int, max_context: int, reserve: int,
                      memory_fraction: float = 0.9) -> int:
    """GPU: a fraction of the device memory, less what is in use (the weights) and ``reserve`` for
    activations. CPU: room for four full contexts, at most 4 GiB (a host has other users)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(int(total * memory_fraction) - (total - free) - reserve, 0)
    return min(4 * max_context * per_token, 4 * 2**30)


class ModelRunner:
    def __init__(
        self, network: Qwen2AudioForConditionalGeneration, features: FeatureExtractor, options: EngineOptions
    ) -> None:
        """``options.kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (float8 e4m3, unscaled:
        half the bytes a decode step reads, at some precision; opt-in, as in vLLM). Decode-only
        steps of at most ``max_graph_batch`` sequences go through the static decoder: by default
        where CUDA graphs replay it (CUDA, the Triton kernels, not ``enforce_eager``)."""
        self.network, self.features = network, features
        self.block_size = options.block_size
        self.device, self.dtype = network.device, network.dtype
        if self.device.type == "cpu":
            heap.keep_freed()  # every step allocates and frees activations: see heap.keep_freed
        self.cache_dtype = kv_cache_dtype(options.kv_cache_dtype, self.dtype)
        network.backend.verify_cache(network.config.text, self.device, self.dtype, self.cache_dtype)
        # the adapters' buffers first: the KV cache takes what memory is left after them
        self.lora = LoraManager(network, options.max_loras, options.max_lora_rank) if options.max_loras > 0 else None
        self.num_blocks = self._kv_blocks(options)
        self.scratch_block = self.num_blocks  # one more block, never handed out: padded rows write there
        text = network.config.text
        shape = (self.num_blocks + 1, self.block_size, text.num_key_value_heads, text.head_dim)
        zeros = {"dtype": self.cache_dtype, "device": self.device}
        self.caches: list[KVCache] = [(torch.zeros(shape, **zeros), torch.zeros(shape, **zeros))
                                      for _ in range(text.num_hidden_layers)]
        self.encoder_cache = EncoderCache(options.encoder_cache_bytes)
        self.static = self._static_decoder(options)
        self.compiled = self._compiled_decoder(options)

    def enable_lora(self, max_loras: int, max_rank: int) -> LoraManager:
        """Adapter slots for an engine built without them: the decode graphs are captured again
        with the low-rank products in them (the compiled CPU step is dropped: it takes no adapters)."""
        if self.lora is None:
            self.lora = LoraManager(self.network, max_loras, max_rank)
            self.compiled = None
            if self.static is not None:
                self.static.lora = self.lora.context
                if self.static.graphs:
                    self.static.capture()
        return self.lora

    def _kv_blocks(self, options: EngineOptions) -> int:
        per_block = kv_bytes_per_block(self.network, self.block_size, self.cache_dtype)
        budget = options.kv_cache_bytes
        if budget is None:
            reserve = activation_reserve(self.network, options.max_batch_tokens, options.max_running)
            budget = default_kv_budget(self.device, per_block // self.block_size,
                                       self.network.config.text.max_position_embeddings, reserve,
                                       options.memory_fraction)
        blocks = max(budget // per_block - 1, 1)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.block_size,
                    blocks * per_block / 2**30)
        return blocks

    def _static_decoder(self, options: EngineOptions) -> StaticDecoder | None:
        """The fixed-buffer decode path, captured into CUDA graphs on CUDA (None: decode eagerly)."""
        graphs = self.device.type == "cuda" and not options.enforce_eager
        wanted = options.static_decode if options.static_decode is not None else graphs
        max_batch = min(options.max_graph_batch, options.max_running)
        if not wanted or max_batch <= 0:
            return None
        if self.device.type == "cuda" and not self.network.backend.kernels:
            logger.warning("no CUDA graphs: they need the Triton kernels (is triton installed?)")
            return None
        static = StaticDecoder(self.network, self.caches, self.block_size, self.scratch_block,
                               self.network.config.text.max_position_embeddings, max_batch)
        static.lora = self.lora.context if self.lora is not None else None
        if graphs:
            try:
                static.capture()
            except Exception:  # a device or driver that cannot capture: decode eagerly instead
                logger.exception("CUDA graph capture failed; decode steps run eagerly")
                return None
        return static

    def _compiled_decoder(self, options: EngineOptions) -> CompiledDecoder | None:
        """The torch.compile'd decode step, where asked for (CUDA has its graphs instead)."""
        if not options.compile_decode or self.static is not None:
            return None
        if self.lora is not None:
            logger.warning("no compiled decode step: it does not take LoRA adapters")
            return None
        if self.network.backend.onednn:
            logger.warning("no compiled decode step: the network has oneDNN linear layers (load it with "
                           "cpu_onednn=False, as compile_decode does)")
            return None
        return CompiledDecoder(self.network, self.caches, self.block_size, self.scratch_block,
                               min(DECODE_ROWS, options.max_running))

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Logits [S, vocab] (float32) for step.requests (prefills, then decodes)."""
        if not step.prefills and self.static is not None and self.static.bucket(len(step.decodes)):
            return self.static.execute(step.decodes)
        if not step.prefills and self.compiled is not None and self.compiled.handles(len(step.decodes)):
            logits = self.compiled.execute(step.decodes)
            if logits is not None:
                return logits
        requests = step.requests
        chunks = self._chunks(step)
        inputs = flatten(chunks, self.device)
        slots = [r.table.slot(p, self.block_size) for r, c in zip(requests, chunks, strict=True) for p in c.positions]
        meta = self._metadata(requests, inputs.query_lens, slots, len(step.prefills))
        with self._adapters(requests, inputs.query_lens):
            hidden = self.network(inputs.input_ids, inputs.positions, meta, self.caches, inputs.audio_embeds,
                                  inputs.audio_index)
            return self.network.logits(hidden[inputs.last_rows])

    def _adapters(self, requests: Sequence[Request], query_lens: list[int]) -> AbstractContextManager[None]:
        """The LoRA slot of every row (decoder) and every request (output layer), where any has one."""
        if self.lora is None or all(r.adapter is None for r in requests):
            return nullcontext()
        slots = np.array([r.adapter.slot if r.adapter is not None else 0 for r in requests])
        rows, head = np.repeat(slots, query_lens), torch.from_numpy(slots).to(self.device)
        if len(rows) > GROUPED_ROWS:  # a prefill's many rows: one product per adapter (see LoraContext)
            return self.lora.context.using(groups={"decoder": grouped(rows, self.device)}, head=head)
        return self.lora.context.using(decoder=torch.from_numpy(rows).to(self.device), head=head)

    def _chunks(self, step: ScheduledStep) -> list[Chunk]:
        """What each request computes: a prefill its uncached tokens (with the audio they cover),
        a decode the token sampled last step (no need to copy the whole history)."""
        embeds = self._encode([(_clip_key(digest, r.adapter), samples, windows, r.adapter)
                               for r in step.prefills
                               for digest, samples, windows in zip(r.prompt.digests, r.prompt.audios,
                                                                   r.prompt.windows, strict=True)])
        chunks = [Chunk(r.all_ids[r.num_computed:], r.num_computed,
                        [(offset, embeds[_clip_key(digest, r.adapter)])
                         for offset, digest in zip(r.prompt.offsets, r.prompt.digests, strict=True)])
                  for r in step.prefills]
        return chunks + [Chunk([r.output_ids[-1]], r.num_tokens - 1) for r in step.decodes]

    def _metadata(
        self, requests: Sequence[Request], query_lens: list[int], slots: list[int], num_prefills: int
    ) -> AttentionMetadata:
        width = max(len(r.table.blocks) for r in requests)
        tables = torch.tensor([r.table.blocks + [0] * (width - len(r.table.blocks)) for r in requests],
                              dtype=torch.long, device=self.device)  # [S, width]
        context = [r.num_tokens for r in requests]
        return AttentionMetadata(
            query_lens, context, torch.tensor(slots, dtype=torch.long, device=self.device), tables,
            num_prefills, torch.tensor(context[num_prefills:], device=self.device),
        )

    def _encode(self, clips: Sequence[tuple[str, np.ndarray, list[Window], Loaded | None]]
                ) -> dict[str, torch.Tensor]:
        """Embeddings per clip key (see _clip_key): cached ones reused, the rest encoded in one batch
        over their windows."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, tuple[np.ndarray, list[Window], Loaded | None]] = {}
        for key, samples, windows, adapter in clips:
            cached = self.encoder_cache.get(key)
            if cached is not None:
                found[key] = cached
            elif key not in missing:
                missing[key] = samples, windows, adapter
        if missing:
            self.encoder_cache.misses += len(missing)
            feats = self.features([s for s, _, _ in missing.values()], device=self.device,
                                  windows=[w for _, w, _ in missing.values()])
            with self._audio_adapters([a for _, _, a in missing.values()], feats.window_counts, feats.window_tokens):
                rows = self.network.encode_audio(feats.input_features, feats.feature_attention_mask,
                                                 feats.window_tokens)
            for key, clip_rows in zip(missing, rows.split(feats.token_counts), strict=True):
                found[key] = clip_rows
                self.encoder_cache.put(key, clip_rows)
        return found

    def _audio_adapters(self, adapters: list[Loaded | None], window_counts: list[int], window_tokens: list[int]
                        ) -> AbstractContextManager[None]:
        """The LoRA slot of every window (encoder) and audio row (projector), where a clip's adapter
        changes the audio side."""
        if self.lora is None or not any(a is not None and a.audio for a in adapters):
            return nullcontext()
        windows = np.repeat([a.slot if a is not None and a.audio else 0 for a in adapters], window_counts)
        return self.lora.context.using(groups={"encoder": grouped(windows, self.device),
                                               "projector": grouped(np.repeat(windows, window_tokens), self.device)})


def _clip_key(digest: str, adapter: Loaded | None) -> str:
    """The encoder cache's key: the clip's digest, and the adapter's where it changes the audio side."""
    return f"{digest}@{adapter.key}" if adapter is not None and adapter.audio else digest
