"""The CPU int8 and int4 decode kernels (model/cpu_kernels.py): against a float64 product of the codes
by hand (for int4 also with the activations rounded by hand as the kernel documents), at every decode
row count and both compute dtypes; built wherever the CPU can run them; torch's kernels in their place
when they cannot (or are turned off)."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.model import cpu_kernels
from qwen2audio.model.quant import (
    DECODE_ROWS,
    QuantConfig,
    QuantizedLinear,
    lanes_codes,
    lanes_layout,
    lanes_scales,
    pack_int4,
)

CAN_RUN = cpu_kernels._unusable() is None
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason=f"the kernel cannot run here: {cpu_kernels._unusable()}")


@pytest.fixture(autouse=True, scope="module")
def _built():
    """The operators exist once built (each test may run alone)."""
    if CAN_RUN:
        cpu_kernels.available()


def operands(rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
    """Activations with a few channels 30x the rest (as the residual stream has), codes, row scales."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, 5::41] *= 30
    codes = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = (torch.rand(out_features, generator=generator) / 50 + 1e-3).to(torch.bfloat16)
    return x.to(dtype), codes, scales


def test_the_kernel_is_built_where_the_cpu_can_run_it():
    """On x86-64 Linux with AVX-512BW, falling back silently would hide a broken build."""
    if CAN_RUN:
        assert cpu_kernels.available(), cpu_kernels._built()
    else:
        assert not cpu_kernels.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, DECODE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 64), (200, 896), (64, 1536)])
def test_the_kernel_against_a_hand_product(rows, dtype, shape):
    x, codes, scales = operands(rows, *shape, dtype)
    expected = (x.double() @ codes.double().T) * scales.double()
    got = cpu_kernels.int8_linear(x, codes, scales.float())
    assert got.shape == (rows, shape[0]) and got.dtype == dtype
    error = ((got.double() - expected).norm() / expected.norm()).item()
    # float32: the activations' int16 codes and their residuals carry x to ~1e-9; bfloat16: the output's rounding.
    assert error < (1e-6 if dtype == torch.float32 else 4e-3), error
    torchs = torch.ops.aten._weight_int8pack_mm(x, codes, scales.to(dtype))
    assert error <= 1.05 * ((torchs.double() - expected).norm() / expected.norm()).item() + 1e-7


@needs_kernel
def test_refusals():
    x, codes, scales = operands(1, 64, 128, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_kernels.int8_linear(x[:, :96], codes[:, :96].contiguous(), scales)
    with pytest.raises(RuntimeError, match="shapes differ"):
        cpu_kernels.int8_linear(x, codes[:32], scales)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        cpu_kernels.int8_linear(x, codes.float(), scales)


def _layer(in_features: int) -> tuple[QuantizedLinear, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(in_features, 80, bias=True)
    linear.weight.data = torch.randn(80, in_features, generator=generator)
    linear.bias.data = torch.randn(80, generator=generator)
    return QuantizedLinear.from_float(linear, QuantConfig("int8"), dtype=torch.float32), linear.bias.data


@pytest.mark.parametrize("in_features", [128, 96])
def test_layers_take_the_kernel_where_it_fits_and_torchs_elsewhere(in_features, monkeypatch):
    """Same numbers either way; a layer whose width is no multiple of 64 stays on torch's kernel."""
    layer, bias = _layer(in_features)
    x = torch.randn(3, in_features)
    with torch.inference_mode():
        ours = layer(x)
    assert layer._own_int8 == (CAN_RUN and in_features % 64 == 0)
    monkeypatch.setenv("QWEN2AUDIO_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    plain, _ = _layer(in_features)
    with torch.inference_mode():
        theirs = plain(x)
    assert not plain._own_int8
    reference = (x.double() * layer.input_scale.double()) @ (layer.qweight.double() * layer.scales.double()[:, None]).T
    for got in (ours, theirs):
        assert ((got.double() - bias.double() - reference).norm() / reference.norm()).item() < 1e-6


# ----- int4 ---------------------------------------------------------------------------------------


def int4_operands(rows: int, out_features: int, in_features: int, group: int, dtype: torch.dtype, seed: int = 0):
    """Activations with outlier channels, codes 0..15, bfloat16 scales and zeros per group, and the
    float64 weight they stand for: (q - 8) * scale + zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, 5::41] *= 30
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(out_features, in_features // group, generator=generator) / 50 + 1e-3).to(torch.bfloat16)
    zeros = (torch.randn(out_features, in_features // group, generator=generator) / 20).to(torch.bfloat16)
    weight = ((codes.double() - 8).reshape(out_features, -1, group) * scales.double()[..., None]
              + zeros.double()[..., None]).reshape(out_features, in_features)
    return x.to(dtype), codes, scales, zeros, weight


def rounded_by_hand(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 activations as the int4 kernel documents it takes them: int8 codes per 32 inputs,
    step max |x| / 127, round half to even."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    step = blocks.abs().amax(dim=2, keepdim=True) / 127
    return (torch.round(blocks / step) * step).reshape(x.shape)


def test_the_lanes_layout_by_hand():
    """Byte 4r + j of each 64 bytes (16 rows x 8 inputs) holds row r's input j low and j + 4 high."""
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    lanes = lanes_layout(pack_int4(codes)).reshape(-1)
    for block, chunk, row, j in ((0, 0, 0, 0), (0, 3, 7, 2), (1, 7, 15, 3), (1, 2, 9, 1)):
        byte = int(lanes[((block * 8 + chunk) * 16 + row) * 4 + j])
        code_row = codes[block * 16 + row]
        assert byte & 15 == code_row[chunk * 8 + j] and byte >> 4 == code_row[chunk * 8 + 4 + j]
    assert torch.equal(lanes_codes(lanes.reshape(32, 32)), codes)
    scales, zeros = torch.rand(32, 2), torch.rand(32, 2)
    both = lanes_scales(scales, zeros)
    assert both.shape == (2, 2, 2, 16) and both[1, 1, 0, 3] == scales[19, 1].bfloat16()
    assert both[1, 0, 1, 15] == zeros[31, 0].bfloat16()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, DECODE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "group"), [((32, 128), 32), ((48, 512), 64), ((96, 768), 128)])
def test_the_int4_kernel_against_a_hand_product(rows, dtype, shape, group):
    x, codes, scales, zeros, weight = int4_operands(rows, *shape, group, dtype)
    got = cpu_kernels.int4_linear(x, lanes_layout(pack_int4(codes)), lanes_scales(scales, zeros), group)
    assert got.shape == (rows, shape[0]) and got.dtype == dtype
    exact = x.double() @ weight.T
    error = ((got.double() - exact).norm() / exact.norm()).item()
    if dtype == torch.float32:  # two levels of activation codes: about 2e-5 of the exact product
        assert error < 6e-5, error
        return
    # bfloat16: the hand-rounded activations' product, up to the output's rounding (the offset of 8
    # comes off the rounded codes, the zeros take the exact sums, as the kernel says).
    centred = (codes.double() - 8).reshape(shape[0], -1, group) * scales.double()[..., None]
    sums = x.double().reshape(rows, -1, group).sum(2)
    expected = rounded_by_hand(x) @ centred.reshape(shape).T + sums @ zeros.double().T
    assert ((got.double() - expected).norm() / expected.norm()).item() < 2.5e-3
    assert error < 1.5e-2, error


@needs_kernel
def test_int4_refusals():
    x, codes, scales, zeros, _ = int4_operands(1, 32, 128, 32, torch.float32)
    lanes, both = lanes_layout(pack_int4(codes)), lanes_scales(scales, zeros)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.int4_linear(x, lanes, both, 48)
    with pytest.raises(RuntimeError, match="shapes differ"):
        cpu_kernels.int4_linear(x[:, :64], lanes, both, 32)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_kernels.int4_linear(x, lanes, both[:, :2].contiguous(), 32)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        cpu_kernels.int4_linear(x, lanes.to(torch.int8), both, 32)
    assert not cpu_kernels.int4_fits(40, 128, 32) and not cpu_kernels.int4_fits(32, 96, 64)


def test_int4_layers_take_the_kernel_where_it_can_run_and_torchs_elsewhere(monkeypatch):
    """The same layer decodes through our kernel (lanes order) or torch's (its CPU layout) to within
    our kernel's activation rounding, and either way prefill and saving read the codes back."""
    generator = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(256, 128, bias=True)  # whole blocks of both layouts (16 and 64 rows)
    linear.weight.data = torch.randn(128, 256, generator=generator) * 0.05
    config = QuantConfig("int4", 64)
    x = torch.randn(3, 256, generator=generator).to(torch.bfloat16)
    ours = QuantizedLinear.from_float(linear, config, dtype=torch.bfloat16)
    saved = ours.qweight.clone()
    monkeypatch.setenv("QWEN2AUDIO_CPU_KERNELS", "0")
    theirs = QuantizedLinear.from_float(linear, config, dtype=torch.bfloat16)
    theirs.prepare()
    monkeypatch.delenv("QWEN2AUDIO_CPU_KERNELS")
    ours.prepare()
    assert ours._layout == ("lanes" if CAN_RUN else "cpu") and theirs._layout == "cpu"
    with torch.inference_mode():
        decoded, reference = ours(x), theirs(x)
        prefill = ours(x.repeat(DECODE_ROWS, 1))[:3]
    assert ((decoded.double() - reference.double()).norm() / reference.double().norm()).item() < 1.5e-2
    assert torch.allclose(prefill.float(), theirs(x.repeat(DECODE_ROWS, 1))[:3].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(ours.saved_qweight(), saved) and torch.equal(theirs.saved_qweight(), saved)


# ----- decode attention ------------------------------------------------------------------------------


def attention_by_hand(query, k_cache, v_cache, tables, lengths):
    """float64 softmax(q k / sqrt(d)) v for each sequence over its first lengths[s] keys, read slot by
    slot through its block table, query head j on KV head j // (H / KVH)."""
    block_size, kv_heads, dim = k_cache.shape[1:]
    heads = query.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for s, length in enumerate(lengths.tolist()):
        slots = [int(tables[s, p // block_size]) * block_size + p % block_size for p in range(length)]
        keys = k_cache.double().reshape(-1, kv_heads, dim)[slots]  # [L, KVH, d]
        values = v_cache.double().reshape(-1, kv_heads, dim)[slots]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            weights = torch.softmax(keys[:, kv] @ query[s, h].double() / dim**0.5, dim=0)
            out[s, h] = weights @ values[:, kv]
    return out


@needs_kernel
@pytest.mark.parametrize(("query_dtype", "cache_dtype"), [(torch.float32, torch.float32),
                                                          (torch.bfloat16, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 64), (4, 4, 128), (14, 2, 16)])
def test_decode_attention_against_a_hand_softmax(query_dtype, cache_dtype, heads, kv_heads, dim):
    """Sequences of 1 to 70 positions (a partly filled last block, one position, several blocks), blocks
    scattered through the cache in no order."""
    generator = torch.Generator().manual_seed(heads + dim)
    block_size, blocks = 16, 12
    k_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    lengths = torch.tensor([70, 1, 16, 33], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, generator=generator)[:5] for _ in range(4)])
    query = (2 * torch.randn(4, heads, dim, generator=generator)).to(query_dtype)
    got = cpu_kernels.decode_attention(query, k_cache, v_cache, tables, lengths)
    assert got.shape == query.shape and got.dtype == query_dtype
    expected = attention_by_hand(query, k_cache, v_cache, tables, lengths)
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < (1e-6 if query_dtype == torch.float32 else 4e-3), error  # bfloat16: the output's rounding
    assert torch.allclose(got[1].double(), v_cache[tables[1, 0], 0].double().repeat_interleave(heads // kv_heads, 0),
                          rtol=1e-2, atol=1e-2)  # one key: its value, exactly up to rounding


@needs_kernel
def test_decode_attention_refusals():
    k_cache = torch.randn(4, 8, 2, 32)
    query, tables = torch.randn(1, 4, 32), torch.tensor([[0, 3]])
    with pytest.raises(RuntimeError, match="outside its table"):
        cpu_kernels.decode_attention(query, k_cache, k_cache, tables, torch.tensor([17]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(query, k_cache, k_cache, torch.tensor([[0, 4]]), torch.tensor([9]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16 cache"):
        cpu_kernels.decode_attention(query, k_cache.half(), k_cache.half(), tables, torch.tensor([3]))
    assert not cpu_kernels.attention_fits(torch.randn(1, 4, 24), torch.randn(4, 8, 2, 24))
