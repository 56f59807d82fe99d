"""The CPU int8 decode kernel (model/cpu_int8.py): against a float64 product of the codes by hand, at
every decode row count and both compute dtypes; built wherever the CPU can run it; torch's kernel in
its place when it cannot (or is turned off), with the same numbers."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.model import cpu_int8
from qwen2audio.model.quant import DECODE_ROWS, QuantConfig, QuantizedLinear

CAN_RUN = cpu_int8._unusable() is None
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason=f"the kernel cannot run here: {cpu_int8._unusable()}")


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
        assert cpu_int8.available(), cpu_int8._built()
    else:
        assert not cpu_int8.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, DECODE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 64), (200, 896), (64, 1536)])
def test_the_kernel_against_a_hand_product(rows, dtype, shape):
    x, codes, scales = operands(rows, *shape, dtype)
    expected = (x.double() @ codes.double().T) * scales.double()
    got = cpu_int8.int8_linear(x, codes, scales.float())
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
        cpu_int8.int8_linear(x[:, :96], codes[:, :96].contiguous(), scales)
    with pytest.raises(RuntimeError, match="shapes differ"):
        cpu_int8.int8_linear(x, codes[:32], scales)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        cpu_int8.int8_linear(x, codes.float(), scales)


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
    assert not cpu_int8.available()
    plain, _ = _layer(in_features)
    with torch.inference_mode():
        theirs = plain(x)
    assert not plain._own_int8
    reference = (x.double() * layer.input_scale.double()) @ (layer.qweight.double() * layer.scales.double()[:, None]).T
    for got in (ours, theirs):
        assert ((got.double() - bias.double() - reference).norm() / reference.norm()).item() < 1e-6
