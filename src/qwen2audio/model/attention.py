"""Attention over a flattened batch of sequences, with an optional paged KV cache.

Owns the per-step metadata (``AttentionMetadata``, passed down as an argument, never global), the
KV cache layout and its dtypes, and the eager implementation that works on any device; the decode
attention of another backend (model/backend.py) plugs in as an argument of :func:`attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from qwen2audio.model import cpu_kernels

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, kv_heads, head_dim]
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype: "auto" (the model's) or "fp8" (float8 e4m3, unscaled)."""
    choices = {"auto": model_dtype, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
    if name not in choices:
        raise ValueError(f"kv_cache_dtype {name!r}: choose one of {', '.join(choices)}")
    return choices[name]


@dataclass
class AttentionMetadata:
    """Layout of one step: S sequences whose new tokens are concatenated into N rows.

    ``query_lens[i]`` new tokens of sequence i attend to its first ``context_lens[i]`` keys (cached
    ones first, then the new ones). With a cache, ``slot_mapping[n]`` is where row n's key/value go
    and ``block_tables[i]`` lists sequence i's blocks in order.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None  # [N] int64
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int64
    num_prefills: int = -1  # leading sequences with several new tokens; the rest decode one each
    decode_context_lens: torch.Tensor | None = None  # [S - num_prefills] on the device

    def __post_init__(self) -> None:
        if self.num_prefills < 0:
            self.num_prefills = len(self.query_lens)

    @classmethod
    def prefill(cls, query_lens: list[int]) -> AttentionMetadata:
        """Whole prompts with no cache: each sequence attends causally to itself."""
        return cls(list(query_lens), list(query_lens))

    @classmethod
    def decode(cls, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> AttentionMetadata:
        """A step whose every sequence decodes one token, described by tensors alone: what a compiled
        step takes, so that its batch size and context lengths are sizes, not Python values."""
        return cls([], [], slots, block_tables, 0, context_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def decode_tables(self, block_size: int) -> torch.Tensor:
        """The decoding sequences' block tables, cut to the longest of their contexts where the host
        knows it (a step mixing prefills and decodes has its tables as wide as its widest prefill)."""
        tables = self.block_tables[self.num_prefills:]
        lengths = self.context_lens[self.num_prefills:]
        return tables[:, : -(-max(lengths) // block_size)] if lengths else tables


DecodeAttention = Callable[[torch.Tensor, KVCache, AttentionMetadata], torch.Tensor]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta: AttentionMetadata,
    cache: KVCache | None,
    decode: DecodeAttention | None = None,
) -> torch.Tensor:
    """query [N, heads, d], key/value [N, kv_heads, d] -> [N, heads, d], causal per sequence.

    With a cache, the new keys and values are already stored in it (see :func:`write_cache`);
    ``decode`` computes the one-token rows of decoding sequences (default: :func:`decode_attention`)."""
    outputs = []
    start = 0
    for index in range(meta.num_prefills):
        q_len, ctx_len = meta.query_lens[index], meta.context_lens[index]
        q = query[start:start + q_len]
        if cache is None or q_len == ctx_len:  # no cached prefix: the fresh keys, unrounded by an fp8 cache
            k, v = key[start:start + q_len], value[start:start + q_len]
        else:
            k, v = _read_cache(cache, meta.block_tables[index], ctx_len, query.dtype)
        outputs.append(_causal_attention(q, k, v))
        start += q_len
    if start < query.shape[0]:  # the remaining rows decode one token each
        outputs.append((decode or decode_attention)(query[start:], cache, meta))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def decode_attention(query: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
    """One new token per sequence, all sequences in one product: query [D, H, d] -> [D, H, d]."""
    k_cache, v_cache = cache
    tables = meta.decode_tables(k_cache.shape[1])  # [D, B]
    if query.device.type == "cpu":
        if cpu_kernels.attention_fits(query, k_cache):
            return cpu_kernels.decode_attention(query, k_cache, v_cache, tables, meta.decode_context_lens)
        keys = _gather(k_cache, tables, torch.float32).flatten(1, 2)  # [D, L, KVH, d]
        values = _gather(v_cache, tables, torch.float32).flatten(1, 2)
        return _decode_attention_cpu(query, keys, values, meta.decode_context_lens)
    keys = _gather(k_cache, tables, query.dtype).flatten(1, 2).transpose(1, 2)  # [D, KVH, B * block, d]
    values = _gather(v_cache, tables, query.dtype).flatten(1, 2).transpose(1, 2)
    visible = torch.arange(keys.shape[2], device=query.device)[None, :] < meta.decode_context_lens[:, None]
    out = F.scaled_dot_product_attention(
        query[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :],
        enable_gqa=query.shape[1] != keys.shape[1],
    )  # [D, H, 1, d]
    return out[:, :, 0, :]


def _decode_attention_cpu(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
                          ) -> torch.Tensor:
    """query [D, H, d], keys/values [D, L, KVH, d] in float32, row r's first ``lengths[r]`` keys
    visible -> [D, H, d]: two float32 batched products. torch's CPU SDPA is slow for one query row
    (6.9 ms for 800 keys x 32 heads in bf16, against 0.8 ms here: bench/RESULTS.md), and bf16
    products with one row are slower still."""
    batch, heads, dim = query.shape
    kv_heads = keys.shape[2]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float() * dim**-0.5  # heads grouped by KV head
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1))  # [D, KVH, G, L]
    hidden = torch.arange(keys.shape[1], device=query.device)[None, :] >= lengths[:, None]  # [D, L]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), values.transpose(1, 2))  # [D, KVH, G, d]
    return out.reshape(batch, heads, dim).to(query.dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Lq, H, d] are the last Lq positions of a sequence whose keys are k [Lk, KVH, d]."""
    q_len, k_len = q.shape[0], k.shape[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, L, d]
    gqa = q.shape[0] != k.shape[0]
    if q_len == k_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif q_len == 1:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        offset = k_len - q_len
        last_key = offset + torch.arange(q_len, device=q.device)  # [Lq] the last key each query may see
        allowed = torch.arange(k_len, device=q.device)[None, :] <= last_key[:, None]  # [Lq, Lk]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
    return out.transpose(0, 1)  # [Lq, H, d]


def _as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """fp8 caches are indexed through a uint8 view: torch has no fp8 index_copy_ or gather kernels."""
    return cache.view(torch.uint8) if cache.dtype in FP8_TYPES else cache


def _gather(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in ``dtype`` (an fp8 cache widens here)."""
    return _as_bytes(cache)[index].view(cache.dtype).to(dtype)


def write_cache(key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> None:
    """Store key/value [N, kv_heads, d] at flattened cache slots [N]."""
    for tensor, new in zip(cache, (key, value), strict=True):
        if tensor.dtype in FP8_TYPES:  # saturate explicitly, as the kernel does: casts differ by backend
            limit = torch.finfo(tensor.dtype).max
            new = new.clamp(-limit, limit)
        flat = _as_bytes(tensor).view(-1, *tensor.shape[2:])  # [slots, KVH, d]
        flat.index_copy_(0, slots, _as_bytes(new.to(tensor.dtype)))


def _read_cache(
    cache: KVCache, block_table: torch.Tensor, ctx_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache, v_cache = cache
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-ctx_len // block_size)].long()
    k = _gather(k_cache, blocks, dtype).reshape(-1, *k_cache.shape[2:])[:ctx_len]  # [ctx, KVH, d]
    v = _gather(v_cache, blocks, dtype).reshape(-1, *v_cache.shape[2:])[:ctx_len]
    return k, v
