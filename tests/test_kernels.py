"""The Triton kernels against the eager torch code they replace.

On the CPU they run in Triton's interpreter (the same kernel source the GPU compiles), in fp32;
with a GPU the same checks run compiled, in fp32 and bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

kernels = pytest.importorskip("qwen2audio.model.kernels")

from qwen2audio.config import TextConfig  # noqa: E402
from qwen2audio.model.attention import AttentionMetadata, attention, write_cache  # noqa: E402
from qwen2audio.model.backend import self_check  # noqa: E402
from qwen2audio.model.layers import RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402

# The CPU runs the kernels in Triton's interpreter (tests/conftest.py turns it on where there is no
# GPU); with a GPU they are compiled, and CPU tensors are not theirs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else (["cuda"] if torch.cuda.is_available() else [])


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [64, 96])
def test_rms_norm_with_and_without_residual(device: str, width: int) -> None:
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(width)
        norm = RMSNorm(width, 1e-6)
        norm.weight.data = torch.rand(width, generator=gen) + 0.5
        norm = norm.to(device, dtype)
        x = torch.randn(5, width, generator=gen).to(device, dtype) * 3
        residual = torch.randn(5, width, generator=gen).to(device, dtype)

        out, res = kernels.rms_norm(x, norm.weight, norm.eps)
        assert res is None
        _close(out, norm(x), dtype)

        out, res = kernels.rms_norm(x, norm.weight, norm.eps, residual)
        expected_sum = residual + x
        assert torch.equal(res, expected_sum)  # the sum is rounded exactly as the eager add
        _close(out, norm(expected_sum), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(device: str) -> None:
    for dtype in _dtypes(device):
        gate_up = torch.randn(3, 2 * 80, generator=torch.Generator().manual_seed(1)).to(device, dtype) * 4
        gate, up = gate_up.chunk(2, dim=-1)
        _close(kernels.silu_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (7, 1, 32), (6, 6, 24)])
def test_rope_and_cache_write(device: str, heads: int, kv_heads: int, head_dim: int) -> None:
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(heads * head_dim)
        n, block_size, blocks = 5, 4, 6
        qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
        positions = torch.tensor([0, 1, 17, 300, 4095], device=device)
        cos, sin = RotaryEmbedding(head_dim, 1_000_000.0)(positions, dtype)
        slots = torch.tensor([3, 22, 0, 9, 14], device=device)
        k_cache = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)

        q, k, v = qkv.clone().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q_ref = apply_rotary(q.reshape(n, heads, head_dim), cos, sin)
        k_ref = apply_rotary(k.reshape(n, kv_heads, head_dim), cos, sin)
        v_ref = v.reshape(n, kv_heads, head_dim)

        out = kernels.rope_and_cache(qkv, cos, sin, heads, kv_heads, slots, (k_cache, v_cache))
        q_new, k_new, v_new = out.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        _close(q_new.reshape(n, heads, head_dim), q_ref, dtype)
        _close(k_new.reshape(n, kv_heads, head_dim), k_ref, dtype)
        assert torch.equal(v_new.reshape(n, kv_heads, head_dim), v_ref)
        flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
        _close(flat_k[slots], k_ref, dtype)
        assert torch.equal(flat_v[slots], v_ref)
        untouched = torch.ones(blocks * block_size, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert not flat_k[untouched.to(device)].any() and not flat_v[untouched.to(device)].any()


def _paged_case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lens: list[int],
                filler: int = 10_000):
    """Random caches, each sequence's blocks scattered over the pool in a shuffled order; table entries
    past a sequence's blocks hold ``filler`` (out of range by default: the kernel must not read them)."""
    gen = torch.Generator().manual_seed(sum(lens) + heads)
    block_size = 16
    needed = [-(-n // block_size) for n in lens]
    pool = sum(needed) + 3
    order = torch.randperm(pool, generator=gen).tolist()
    width = max(needed) + 2
    tables = torch.full((len(lens), width), filler, dtype=torch.int32)
    taken = 0
    for i, count in enumerate(needed):
        tables[i, :count] = torch.tensor(order[taken:taken + count])
        taken += count
    k_cache = torch.randn(pool, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(pool, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    query = torch.randn(len(lens), heads, head_dim, generator=gen).to(device, dtype)
    return query, (k_cache, v_cache), tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (14, 2, 32), (4, 4, 24), (3, 3, 128)])
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_matches_sdpa(device: str, heads: int, kv_heads: int, head_dim: int, splits: int) -> None:
    for dtype in _dtypes(device):
        lens = [1, 16, 17, 150]
        query, cache, tables, context = _paged_case(device, dtype, heads, kv_heads, head_dim, lens)
        out = kernels.paged_decode_attention(query, cache, tables, context, splits=splits, tile=32)
        k_cache, v_cache = cache
        for i, n in enumerate(lens):
            slots = torch.arange(n, device=device)
            blocks = tables[i].long()[slots // 16]
            k = k_cache[blocks, slots % 16]  # [n, KVH, d]
            v = v_cache[blocks, slots % 16]
            expected = F.scaled_dot_product_attention(
                query[i][:, None, :], k.transpose(0, 1), v.transpose(0, 1), enable_gqa=heads != kv_heads
            )[:, 0, :]
            _close(out[i], expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_agrees_with_the_eager_decode_path(device: str) -> None:
    """The kernel and attention()'s own batched decode path read the same paged layout alike."""
    lens = [5, 33, 64]
    query, cache, tables, context = _paged_case(device, torch.float32, 4, 2, 16, lens, filler=0)
    meta = AttentionMetadata([1, 1, 1], lens, torch.zeros(3, dtype=torch.long, device=device),
                             tables.long(), 0, context)
    k_cache, v_cache = cache
    slot_values = [(tables[i, (n - 1) // 16].item() * 16 + (n - 1) % 16) for i, n in enumerate(lens)]
    meta.slot_mapping = torch.tensor(slot_values, device=device)
    new_k = k_cache.view(-1, 2, 16)[meta.slot_mapping].clone()  # rewriting the last key leaves it unchanged
    new_v = v_cache.view(-1, 2, 16)[meta.slot_mapping].clone()
    eager = attention(query, new_k, new_v, meta, cache)
    _close(kernels.paged_decode_attention(query, cache, tables, context), eager, torch.float32)


def text_config(heads: int, kv_heads: int, head_dim: int, hidden: int) -> TextConfig:
    return TextConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_size=hidden)


GQA, MHA = text_config(14, 2, 32, 64), text_config(4, 4, 32, 64)


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels on CPU tensors")
def test_self_check_passes_and_names_a_broken_kernel(monkeypatch):
    cpu = torch.device("cpu")
    assert self_check(GQA, cpu, torch.float32) is None
    assert self_check(MHA, cpu, torch.float32) is None  # multi-head: the vector kernel
    monkeypatch.setattr(kernels, "silu_mul", lambda gate_up: gate_up[:, : gate_up.shape[1] // 2].clone())
    assert "silu_mul" in self_check(GQA, cpu, torch.float32)
    monkeypatch.setattr(kernels, "rms_norm", lambda *args: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    assert self_check(GQA, cpu, torch.float32) == "RuntimeError: no kernel image"


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels on CPU tensors")
def test_kernels_that_fail_their_self_check_fall_back_to_the_eager_ops_unless_required(monkeypatch, caplog):
    """The auto mode's fallback (on CUDA when the kernels are not asked for explicitly), run here
    on the CPU in the interpreter: a broken kernel gives the eager ops and a warning; asked-for
    kernels raise instead; working ones are bound."""
    from qwen2audio.model.backend import TritonOps, kernels_backend

    cpu = torch.device("cpu")
    assert isinstance(kernels_backend(GQA, cpu, torch.float32, torch.float32, False, required=False).ops, TritonOps)
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda query, *args: torch.zeros_like(query))
    with caplog.at_level("WARNING"):
        fallback = kernels_backend(GQA, cpu, torch.float32, torch.float32, False, required=False)
    assert not fallback.kernels and "paged_decode_attention differs" in caplog.text
    with pytest.raises(RuntimeError, match="paged_decode_attention differs"):
        kernels_backend(GQA, cpu, torch.float32, torch.float32, False, required=True)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_write_and_decode_read(device: str) -> None:
    """An fp8 KV cache: the kernel stores e4m3 values as torch rounds them, and decode attention over
    them equals attention over the widened cache.

    On the CPU the values are drawn on the e4m3 grid at position 0 (no rotation), so the store
    checks addressing and types but not rounding: Triton 3.9's interpreter rounds a value whose
    rounding carries into the exponent wrongly (7.82 -> 4.0); the GPU converts in hardware and
    gets random values."""
    heads, kv_heads, head_dim, n = 4, 2, 16, 5
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    positions = torch.arange(n)
    if device == "cpu":
        qkv, positions = qkv.to(FP8).float(), torch.zeros(n, dtype=torch.long)
    qkv = qkv.to(device)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(positions.to(device), torch.float32)
    k_ref = apply_rotary(qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim),
                         cos, sin)
    v_ref = qkv[:, (heads + kv_heads) * head_dim:].reshape(n, kv_heads, head_dim).clone()
    cache = tuple(torch.zeros(2, 4, kv_heads, head_dim, dtype=FP8, device=device) for _ in range(2))
    slots = torch.tensor([6, 1, 7, 0, 3], device=device)
    kernels.rope_and_cache(qkv, cos, sin, heads, kv_heads, slots, cache)
    stored_k = cache[0].float().view(-1, kv_heads, head_dim)[slots]
    stored_v = cache[1].float().view(-1, kv_heads, head_dim)[slots]
    torch.testing.assert_close(stored_k, k_ref.to(FP8).float(), atol=0, rtol=0)
    torch.testing.assert_close(stored_v, v_ref.to(FP8).float(), atol=0, rtol=0)

    query, (k_cache, v_cache), tables, context = _paged_case(device, torch.float32, 4, 2, 16, [7, 40])
    fp8_cache = (k_cache.to(FP8), v_cache.to(FP8))
    widened = (fp8_cache[0].float(), fp8_cache[1].float())
    _close(kernels.paged_decode_attention(query, fp8_cache, tables, context, splits=2),
           kernels.paged_decode_attention(query, widened, tables, context, splits=2), torch.float32)
    assert self_check(text_config(4, 2, 16, 64), torch.device(device), torch.float32, FP8) is None


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_saturates_on_both_paths(device: str) -> None:
    """Keys and values past e4m3's largest value (448) are stored as +-448 by the kernel and by the
    eager write alike, never as NaN."""
    heads, kv_heads, head_dim = 2, 1, 16
    qkv = torch.full((1, (heads + 2 * kv_heads) * head_dim), 1000.0, device=device)
    qkv[0, -head_dim:] = -2000.0  # the value head
    cos = torch.ones(1, head_dim, device=device)
    sin = torch.zeros(1, head_dim, device=device)
    kernel_cache = tuple(torch.zeros(1, 4, kv_heads, head_dim, dtype=FP8, device=device) for _ in range(2))
    kernels.rope_and_cache(qkv.clone(), cos, sin, heads, kv_heads, torch.tensor([2], device=device), kernel_cache)
    eager_cache = tuple(torch.zeros(1, 4, kv_heads, head_dim, dtype=FP8, device=device) for _ in range(2))
    key = qkv[:, heads * head_dim:(heads + 1) * head_dim].reshape(1, 1, head_dim)
    write_cache(key, qkv[:, -head_dim:].reshape(1, 1, head_dim), torch.tensor([2], device=device), eager_cache)
    for cache in (kernel_cache, eager_cache):
        assert torch.equal(cache[0][0, 2].float(), torch.full((1, head_dim), 448.0, device=device))
        assert torch.equal(cache[1][0, 2].float(), torch.full((1, head_dim), -448.0, device=device))


@pytest.mark.skipif(not INTERPRETED, reason="without the interpreter test_kernels_compile.py runs directly")
def test_every_kernel_compiles_for_sm90(compile_check):
    """The interpreter is on in this process, so the compile checks run in a child without it,
    started when the session starts (tests/conftest.py)."""
    assert compile_check is not None, "the compile check was not started"
    output, _ = compile_check.communicate(timeout=600)
    assert compile_check.returncode == 0, output[-4000:]
    assert "passed" in output and "skipped" not in output
