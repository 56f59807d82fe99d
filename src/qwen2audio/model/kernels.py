"""Triton kernels for the decoder's hot path: paged decode attention and the small fused ops.

Owns the kernels and their launch wrappers; it must not know about requests or scheduling.
Importing this module needs ``triton``; model/backend.py checks that it can run before importing it. On a machine
without a GPU the same kernels run on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
is set before triton is imported (the test suite does this), slowly and in fp32 only.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


def fp8_limit(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 cache dtype (values beyond it are clamped to it), else 0."""
    return float(torch.finfo(dtype).max) if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else 0.0


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def _precision(dtype: torch.dtype) -> str:
    """fp32 products stay fp32 (tf32 would break the eager path's greedy tokens); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# RMSNorm, optionally after adding the residual stream (Qwen2: normalise in fp32, scale in dtype)


@triton.jit
def _rms_norm(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                 HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(ResOut + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=ok)




def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [N, D] -> (weight * norm(x + residual), x + residual); the sum is rounded to x's dtype first,
    as the eager ``residual + hidden`` is."""
    n, d = x.shape
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    res_out = torch.empty_like(x) if residual is not None else None
    if n:
        r = residual if residual is not None else x
        ro = res_out if res_out is not None else x
        _rms_norm[(n,)](x, r, weight, out, ro, x.stride(0), r.stride(0), out.stride(0), ro.stride(0), d, eps,
                        HAS_RES=residual is not None, BLOCK=_pow2(d))
    return out, res_out


# ---------------------------------------------------------------------------------------------
# SiLU(gate) * up over the fused gate/up product


@triton.jit
def _silu_mul(X, Out, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # rounded like F.silu's output
    tl.store(Out + row * stride_o + cols, (silu * up).to(Out.dtype.element_ty), mask=ok)




def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate first) -> silu(gate) * up [N, I]."""
    n, width = gate_up.shape
    cols = width // 2
    out = torch.empty(n, cols, dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = min(1024, _pow2(cols))
        _silu_mul[(n, triton.cdiv(cols, block))](gate_up, out, gate_up.stride(0), out.stride(0), cols, BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# Rotary embedding in place over the fused qkv product, writing the new keys/values to the cache


@triton.jit
def _rope_cache(QKV, Cos, Sin, Slots, KC, VC, stride_row, stride_cos, stride_slot,
                   HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                   WRITE_CACHE: tl.constexpr, LIMIT: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    cols = tl.arange(0, HALF_PAD)
    ok = cols < half
    base = QKV + token * stride_row + head * HEAD_DIM
    if head < HEADS + KV_HEADS:  # a query or key head: rotate (rotate_half layout)
        x1 = tl.load(base + cols, mask=ok, other=0.0)
        x2 = tl.load(base + half + cols, mask=ok, other=0.0)
        c1 = tl.load(Cos + token * stride_cos + cols, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(Cos + token * stride_cos + half + cols, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(Sin + token * stride_cos + cols, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(Sin + token * stride_cos + half + cols, mask=ok, other=0.0).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        y1 = (f1 * c1 - f2 * s1).to(x1.dtype)
        y2 = (f2 * c2 + f1 * s2).to(x1.dtype)
        tl.store(base + cols, y1, mask=ok)
        tl.store(base + half + cols, y2, mask=ok)
        if WRITE_CACHE:
            if head >= HEADS:
                slot = tl.load(Slots + token * stride_slot).to(tl.int64)
                dst = KC + (slot * KV_HEADS + head - HEADS) * HEAD_DIM
                k1, k2 = y1.to(tl.float32), y2.to(tl.float32)  # new names: a branch may not retype y1
                if LIMIT > 0:  # an fp8 cache: saturate, as the eager path does (casts differ by backend)
                    k1 = tl.minimum(tl.maximum(k1, -LIMIT), LIMIT)
                    k2 = tl.minimum(tl.maximum(k2, -LIMIT), LIMIT)
                tl.store(dst + cols, k1.to(KC.dtype.element_ty), mask=ok)
                tl.store(dst + half + cols, k2.to(KC.dtype.element_ty), mask=ok)
    else:  # a value head: copy to the cache
        if WRITE_CACHE:
            slot = tl.load(Slots + token * stride_slot).to(tl.int64)
            dst = VC + (slot * KV_HEADS + head - HEADS - KV_HEADS) * HEAD_DIM
            v1 = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            v2 = tl.load(base + half + cols, mask=ok, other=0.0).to(tl.float32)
            if LIMIT > 0:
                v1 = tl.minimum(tl.maximum(v1, -LIMIT), LIMIT)
                v2 = tl.minimum(tl.maximum(v2, -LIMIT), LIMIT)
            tl.store(dst + cols, v1.to(VC.dtype.element_ty), mask=ok)
            tl.store(dst + half + cols, v2.to(VC.dtype.element_ty), mask=ok)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    slots: torch.Tensor | None = None,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate the query and key heads of qkv [N, (H + 2 KVH) * d] in place (cos/sin [N, d]) and, with
    a cache, store key and value of row n at slot ``slots[n]`` of each [blocks, block_size, KVH, d]
    cache tensor. Returns qkv."""
    n = qkv.shape[0]
    head_dim = cos.shape[-1]
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    if n:
        k_cache, v_cache = cache if cache is not None else (qkv, qkv)
        if cache is not None:
            assert k_cache.is_contiguous() and v_cache.is_contiguous()
        slot_arg = slots if slots is not None else qkv
        _rope_cache[(n, heads + 2 * kv_heads)](
            qkv, cos, sin, slot_arg, k_cache, v_cache, qkv.stride(0), cos.stride(0),
            slots.stride(0) if slots is not None else 0,
            HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, HALF_PAD=_pow2(head_dim // 2),
            WRITE_CACHE=cache is not None, LIMIT=fp8_limit(k_cache.dtype),
        )
    return qkv


# ---------------------------------------------------------------------------------------------
# Paged decode attention: one new query per sequence over its cached keys, split along the context
# (flash-decoding) so that a batch of one still fills the GPU, then one pass merges the splits.


@triton.jit
def _split_range(Lens, seq, stride_len, SPLITS: tl.constexpr, TILE: tl.constexpr):
    """[lo, hi): the context positions this program's split covers, whole tiles except the last."""
    length = tl.load(Lens + seq * stride_len).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), TILE) * TILE
    lo = tl.program_id(2) * per_split
    return lo, tl.minimum(lo + per_split, length)


@triton.jit
def _kv_rows(Tables, seq, stride_tb, offs, ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr):
    """Cache offsets [TILE] of context positions ``offs`` of one KV head, through the block table."""
    blocks = tl.load(Tables + seq * stride_tb + offs // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    return blocks * stride_kb + (offs % BLOCK_SIZE) * stride_ks + kv_head * stride_kh


@triton.jit
def _decode_split(Q, KC, VC, Tables, Lens, PartO, PartM, PartL, scale,
                     stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_len,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr,
                     PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    lo, hi = _split_range(Lens, seq, stride_len, SPLITS, TILE)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for start in range(lo, hi, TILE):
        offs = start + tl.arange(0, TILE)
        ok = offs < hi
        rows = _kv_rows(Tables, seq, stride_tb, offs, ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(KC + rows[:, None] + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)  # [TILE, BLOCK_D]
        v = tl.load(VC + rows[:, None] + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # partials laid out [S, H, SPLITS(, d)]
    part = (seq * (tl.num_programs(1) * GROUP) + heads) * SPLITS + split
    tl.store(PartM + part, m, mask=head_ok)
    tl.store(PartL + part, total, mask=head_ok)
    tl.store(PartO + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_split_mha(Q, KC, VC, Tables, Lens, PartO, PartM, PartL, scale,
                      stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                      SPLITS: tl.constexpr):
    """_decode_split for one query head per KV head (multi-head attention, as Qwen2-Audio's
    decoder): products as vector sums rather than 16-row padded dots, which keeps registers low."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    split = tl.program_id(2)
    lo, hi = _split_range(Lens, seq, stride_len, SPLITS, TILE)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + seq * stride_qt + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(lo, hi, TILE):
        offs = start + tl.arange(0, TILE)
        ok = offs < hi
        rows = _kv_rows(Tables, seq, stride_tb, offs, ok, head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(KC + rows[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)  # [TILE, BLOCK_D]
        s = tl.sum(k * q[None, :], axis=1) * scale  # [TILE]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(VC + rows[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    part = (seq * tl.num_programs(1) + head) * SPLITS + split
    tl.store(PartM + part, m)
    tl.store(PartL + part, total)
    tl.store(PartO + part * HEAD_DIM + d, acc, mask=d_ok)


@triton.jit
def _decode_merge(PartO, PartM, PartL, Out, stride_ot, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                     SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * SPLITS
    k = tl.arange(0, SPLITS_PAD)
    k_ok = k < SPLITS
    m = tl.load(PartM + part + k, mask=k_ok, other=float("-inf"))
    total = tl.load(PartL + part + k, mask=k_ok, other=0.0)
    peak = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp(m - peak), 0.0)  # empty splits weigh nothing
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.load(PartO + (part + k)[:, None] * HEAD_DIM + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(Out + seq * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)




MHA_LAUNCH = (32, 4)  # (tokens per tile, warps) of the decode kernels
GQA_LAUNCH = (64, 8)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(device: torch.device, num_seqs: int, kv_heads: int) -> int:
    """Enough context splits for about two programs per multiprocessor; a function of the batch shape
    only, so a captured graph keeps it."""
    units = _multiprocessors(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(32, math.ceil(2 * units / max(num_seqs * kv_heads, 1))))


def paged_decode_attention(
    query: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    splits: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """query [S, H, d] (one new token per sequence, its key already cached) attends to the first
    context_lens[s] cached positions listed by block_tables [S, W] -> [S, H, d].

    Every context length must be at least 1; rows of block_tables past a sequence's length are
    never read, so they may hold anything."""
    k_cache, v_cache = cache
    num_seqs, heads, head_dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and query.stride(-1) == 1
    out = torch.empty_like(query)
    if not num_seqs:
        return out
    group = heads // kv_heads
    splits = splits or decode_splits(query.device, num_seqs, kv_heads)
    part_o = torch.empty(num_seqs, heads, splits, head_dim, dtype=torch.float32, device=query.device)
    part_m = torch.empty(num_seqs, heads, splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    block_d = _pow2(head_dim)
    args = (query, k_cache, v_cache, block_tables, context_lens, part_o, part_m, part_l,
            scale if scale is not None else head_dim**-0.5,
            query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), context_lens.stride(0))
    # Launch shapes from ptxas' register counts for sm_90 at head 128 (tests/test_kernels.py compiles
    # them): MHA at 32 tokens x 4 warps needs 128 registers, no spills (64 x 4 spills); the GQA dot
    # kernel at 64 x 8 warps needs 224 (64 x 4 spills).
    if group == 1:
        _decode_split_mha[(num_seqs, heads, splits)](
            *args, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE=tile or MHA_LAUNCH[0],
            SPLITS=splits, num_warps=MHA_LAUNCH[1],
        )
    else:
        _decode_split[(num_seqs, kv_heads, splits)](
            *args, GROUP=group, GROUP_PAD=max(16, _pow2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SIZE=block_size, TILE=tile or GQA_LAUNCH[0], SPLITS=splits, PRECISION=_precision(query.dtype),
            num_warps=GQA_LAUNCH[1],
        )
    _decode_merge[(num_seqs, heads)](
        part_o, part_m, part_l, out, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits, SPLITS_PAD=_pow2(splits),
    )
    return out
