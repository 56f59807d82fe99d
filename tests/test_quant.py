"""Weight-only int8/int4 linear layers: each against a reference dequantized by hand from its own
codes with the documented formulas, on both paths (integer kernels for decode rows, a bf16 GEMM for
prefill chunks); rounding error within half a step; rows filled in pieces as a loader would."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen2audio.model.quant import DECODE_ROWS, QuantConfig, QuantizedLinear


def trained_looking(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    """Heavy-tailed rows with a few outlier input channels, as trained weights have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.distributions.StudentT(3.0).sample((out_features, in_features)) * 0.02
    weight[:, torch.randperm(in_features, generator=generator)[:4]] *= 8
    linear = nn.Linear(in_features, out_features, bias=True)
    linear.weight.data, linear.bias.data = weight, torch.randn(out_features, generator=generator) * 0.1
    return linear


def by_hand(layer: QuantizedLinear) -> torch.Tensor:
    if layer.config.scheme == "int8":
        return layer.codes.double() * layer.scales.double()[:, None]
    g = layer.config.group_size
    codes = layer.codes.double().reshape(layer.out_features, -1, g) - 8
    return (codes * layer.scales.double()[..., None] + layer.zeros.double()[..., None]).reshape(layer.out_features, -1)


@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64),
                                    QuantConfig("int4", 128)])
@pytest.mark.parametrize("rows", [1, 5, DECODE_ROWS + 1, 64])
def test_each_layer_against_its_hand_dequantized_weight(config, rows):
    linear = trained_looking(192, 256)
    layer = QuantizedLinear.from_float(linear, config)
    reference = by_hand(layer)
    step = layer.scales.double()
    half_step = (step[:, None] if config.scheme == "int8" else step.repeat_interleave(config.group_size, 1)) / 2
    # Half a step, plus the shift of a group's zero rounded to bfloat16 (2^-9 of it) at the clamped ends.
    shift = 0 if config.scheme == "int8" else layer.zeros.double().abs().repeat_interleave(config.group_size, 1) / 256
    assert ((linear.weight.double() - reference).abs() <= half_step * 1.001 + shift + 1e-7).all()
    x = torch.randn(rows, 256)
    expected = x.to(torch.bfloat16).double() @ reference.T + linear.bias.double()
    with torch.inference_mode():
        got = layer(x).double()
    assert got.shape == (rows, 192) and layer(x).dtype == torch.bfloat16
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-2


def test_rows_filled_in_pieces_equal_the_whole():
    """A fused weight (qkv, gate_up) is filled from separate checkpoint tensors, row ranges at a time."""
    linear = trained_looking(96, 128, seed=1)
    for config in (QuantConfig("int8"), QuantConfig("int4", 32)):
        whole = QuantizedLinear.from_float(linear, config)
        pieces = QuantizedLinear(128, 96, config, bias=True)
        pieces.load_rows(0, linear.weight[:40])
        pieces.load_rows(40, linear.weight[40:])
        assert torch.equal(whole.codes, pieces.codes) and torch.equal(whole.scales, pieces.scales)


def test_bad_schemes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, not 'int3'"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        QuantConfig("int4", 100)
    with pytest.raises(ValueError, match="groups of 128 do not divide a layer of 96 inputs"):
        QuantizedLinear(96, 64, QuantConfig("int4", 128))
