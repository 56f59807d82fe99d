"""Owns the network, the KV cache tensors and the encoder-output cache; runs one scheduled step.

Turns a ScheduledStep into flattened model inputs (token ids, positions, slot mapping, block
tables), runs the audio encoder for clips not already cached, and returns the last-token logits of
every scheduled request. Speed tricks (CUDA graphs, compiled kernels) belong here, behind a switch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from qwen2audio.audio.features import FeatureExtractor
from qwen2audio.engine.cuda_graphs import StaticDecoder
from qwen2audio.engine.request import Request
from qwen2audio.engine.scheduler import ScheduledStep
from qwen2audio.model import kernels_available
from qwen2audio.model.attention import AttentionMetadata, KVCache
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration

logger = logging.getLogger(__name__)


def use_onednn_linears(network: Qwen2AudioForConditionalGeneration) -> int:
    """Swap the decoder's linear layers (and the output head) for oneDNN ones on the CPU.

    MKL's fp32 GEMM is slow for the few rows of a decode step (measured 2-2.6x slower for 1-8 rows
    at these widths) and the same for long prefills; torch's MkldnnLinear keeps the weight in
    oneDNN's blocked layout. Returns how many layers were swapped.
    """
    from torch.utils.mkldnn import MkldnnLinear

    dtype = network.language_model.model.embed_tokens.weight.dtype
    swapped = 0
    modules = [network.language_model, *network.language_model.model.layers]
    for module in modules:
        for parent in module.modules():
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and (parent is not network.language_model or name == "lm_head"):
                    setattr(parent, name, MkldnnLinear(child, dtype))
                    swapped += 1
    return swapped


def kv_bytes_per_block(network: Qwen2AudioForConditionalGeneration, block_size: int, dtype: torch.dtype) -> int:
    text = network.config.text
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * element


def activation_reserve(network: Qwen2AudioForConditionalGeneration, max_batch_tokens: int, max_running: int) -> int:
    """Bytes one step's activations may need beside the weights and the KV cache: the widest prefill
    (its rows through qkv, the MLP and the residual stream) or the audio windows it encodes, plus
    the logits of every running request (and the sampler's copy), with half again for slack."""
    text, audio = network.config.text, network.config.audio
    element = network.language_model.model.embed_tokens.weight.element_size()
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


def _cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    choices = {"auto": model_dtype, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
    if name not in choices:
        raise ValueError(f"kv_cache_dtype {name!r}: choose one of {', '.join(choices)}")
    return choices[name]


def _want_kernels(
    requested: bool | None, network: Qwen2AudioForConditionalGeneration, cache_dtype: torch.dtype
) -> bool:
    """Use the Triton kernels if asked (None: on CUDA when Triton is installed) and they pass their
    self-check on this device; auto mode falls back to the eager ops with a warning."""
    weight = network.language_model.model.embed_tokens.weight
    device = weight.device
    if requested is False or (requested is None and device.type != "cuda"):
        return False
    if not kernels_available(device):
        if requested:
            raise ValueError(f"the Triton kernels cannot run on {device}: install triton (CPU: TRITON_INTERPRET=1)")
        return False
    from qwen2audio.model import kernels

    text = network.config.text
    problem = kernels.self_check(text.num_attention_heads, text.num_key_value_heads, text.head_dim,
                                 text.hidden_size, device, weight.dtype, cache_dtype)
    if problem is None:
        return True
    if requested:
        raise RuntimeError(f"the Triton kernels fail their self-check on {device}: {problem}")
    logger.warning("Triton kernels off (their self-check failed on %s: %s); eager ops and no CUDA graphs",
                   device, problem)
    return False


class EncoderCache:
    """Projected audio embeddings by clip digest, least recently used evicted past a byte budget,
    so a multi-turn chat does not encode the same clip twice."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> torch.Tensor | None:
        value = self._entries.get(digest)
        if value is not None:
            self._entries.move_to_end(digest)
            self.hits += 1
        return value

    def put(self, digest: str, value: torch.Tensor) -> None:
        if digest in self._entries:
            return
        self._entries[digest] = value
        self._bytes += value.numel() * value.element_size()
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


class ModelRunner:
    def __init__(
        self,
        network: Qwen2AudioForConditionalGeneration,
        features: FeatureExtractor,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        encoder_cache_bytes: int = 512 * 2**20,
        cpu_onednn: bool = True,
        kernels: bool | None = None,
        enforce_eager: bool = False,
        max_graph_batch: int = 128,
        max_batch_tokens: int = 16384,
        max_running: int = 256,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``kernels``: the Triton kernels of model/kernels.py (None: on CUDA when Triton is there).
        ``enforce_eager``: no CUDA graphs. Decode-only steps of at most ``max_graph_batch``
        sequences go through the static decoder (graphs on CUDA). ``kv_cache_dtype``: "auto" (the
        model's dtype) or "fp8" (float8 e4m3, unscaled: half the bytes a decode step reads, at some
        precision; opt-in, as in vLLM)."""
        self.network = network
        self.features = features
        self.block_size = block_size
        weight = network.language_model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache_dtype = _cache_dtype(kv_cache_dtype, self.dtype)
        self.use_kernels = _want_kernels(kernels, network, self.cache_dtype)
        if cpu_onednn and self.device.type == "cpu" and torch.backends.mkldnn.is_available():
            logger.info("oneDNN linear layers on the CPU: %d swapped", use_onednn_linears(network))
        text = network.config.text
        per_block = kv_bytes_per_block(network, block_size, self.cache_dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_budget(
            self.device, per_block // block_size, text.max_position_embeddings,
            activation_reserve(network, max_batch_tokens, max_running))
        self.num_blocks = max(budget // per_block - 1, 1)
        self.scratch_block = self.num_blocks  # one more block, never handed out: padded rows write there
        shape = (self.num_blocks + 1, block_size, text.num_key_value_heads, text.head_dim)
        self.caches: list[KVCache] = [
            (torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
             torch.zeros(shape, dtype=self.cache_dtype, device=self.device))
            for _ in range(text.num_hidden_layers)
        ]
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, block_size,
                    self.num_blocks * per_block / 2**30)
        self.static: StaticDecoder | None = None
        graphs = self.device.type == "cuda" and not enforce_eager
        if graphs and not self.use_kernels:
            logger.warning("no CUDA graphs: they need the Triton kernels (is triton installed?)")
        elif graphs and max_graph_batch > 0:
            self.use_static_decoder(max_graph_batch)
            try:
                self.static.capture()
            except Exception:  # a device or driver that cannot capture: decode eagerly instead
                logger.exception("CUDA graph capture failed; decode steps run eagerly")
                self.static = None

    def use_static_decoder(self, max_batch: int) -> None:
        """Run decode-only steps through the static decoder (graphs are captured separately, on
        CUDA): alone, the padded fixed-buffer path the graphs replay, checkable on any device."""
        text = self.network.config.text
        self.static = StaticDecoder(self.network, self.caches, self.block_size, self.scratch_block,
                                    text.max_position_embeddings, max_batch, self.use_kernels)

    @torch.inference_mode()
    def execute_decode(self, requests: Sequence[Request], ahead: int, tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits of a decode step through the static decoder; see :meth:`StaticDecoder.run`."""
        assert self.static is not None
        return self.static.run(requests, ahead, tokens)

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Logits [S, vocab] (float32) for step.prefills + step.decodes, in that order."""
        if not step.prefills and self.static is not None and self.static.bucket(len(step.decodes)):
            return self.static.run(step.decodes)
        requests = [*step.prefills, *step.decodes]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        for index, request in enumerate(requests):
            if index < len(step.prefills):
                start = request.num_computed
                ids.extend(request.all_ids[start:])
            else:  # a decode computes the token sampled last step; no need to copy the whole history
                start = request.num_tokens - 1
                ids.append(request.output_ids[-1])
            span = range(start, request.num_tokens)
            positions.extend(span)
            slots.extend(request.table.slot(p, self.block_size) for p in span)
            query_lens.append(len(span))
        audio, audio_index = self._audio_inputs(step.prefills, query_lens)
        meta = self._metadata(requests, query_lens, slots, len(step.prefills))
        device = self.device
        hidden = self.network(
            torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta, self.caches,
            audio, audio_index,
        )
        last = torch.tensor(query_lens, device=device).cumsum(0) - 1  # [S] each request's last row
        return self.network.logits(hidden[last])

    def _metadata(
        self, requests: Sequence[Request], query_lens: list[int], slots: list[int], num_prefills: int
    ) -> AttentionMetadata:
        width = max(len(r.table.blocks) for r in requests)
        tables = torch.tensor([r.table.blocks + [0] * (width - len(r.table.blocks)) for r in requests],
                              dtype=torch.long, device=self.device)  # [S, width]
        context = [r.num_tokens for r in requests]
        return AttentionMetadata(
            query_lens, context, torch.tensor(slots, dtype=torch.long, device=self.device), tables,
            num_prefills, torch.tensor(context[num_prefills:], device=self.device), self.use_kernels,
        )

    def _audio_inputs(
        self, prefills: Sequence[Request], query_lens: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Embeddings of the audio tokens this step computes, and their rows in the flattened batch."""
        needed = [(r, k) for r in prefills for k in range(len(r.prompt.audios))]
        if not needed:
            return None, None
        embeds = self._encode([(r.prompt.digests[k], r.prompt.audios[k]) for r, k in needed])
        chunks, index = [], []
        row_start = 0
        for request, q_len in zip(prefills, query_lens, strict=False):
            first = request.num_computed
            for k, offset in enumerate(request.prompt.offsets):
                clip = embeds[request.prompt.digests[k]]
                lo, hi = max(offset, first), min(offset + clip.shape[0], first + q_len)
                if lo < hi:
                    chunks.append(clip[lo - offset:hi - offset])
                    index.extend(range(row_start + lo - first, row_start + hi - first))
            row_start += q_len
        if not chunks:
            return None, None
        return torch.cat(chunks), torch.tensor(index, dtype=torch.long, device=self.device)

    def _encode(self, clips: Sequence[tuple[str, object]]) -> dict[str, torch.Tensor]:
        """Embeddings per digest: cached ones reused, the rest encoded in one batch over their windows."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, object] = {}
        for digest, samples in clips:
            cached = self.encoder_cache.get(digest)
            if cached is not None:
                found[digest] = cached
            elif digest not in missing:
                missing[digest] = samples
        if missing:
            self.encoder_cache.misses += len(missing)
            feats = self.features(list(missing.values()), device=self.device)
            rows = self.network.encode_audio(feats.input_features, feats.feature_attention_mask, feats.window_tokens)
            for digest, clip_rows in zip(missing, rows.split(feats.token_counts), strict=True):
                found[digest] = clip_rows
                self.encoder_cache.put(digest, clip_rows)
        return found
