"""The CUDA side of quantized layers, checked where it can be without a GPU: which devices get a
clear refusal, the operand layouts tinygemm and the fp8 GEMM take (against their documented
formats, written out independently here), and fp8 layers against their hand-dequantized weight."""

from __future__ import annotations

import pytest
import torch

from qwen2audio import Qwen2Audio
from qwen2audio.errors import InputError
from qwen2audio.model import quant_cuda
from qwen2audio.model.quant import QuantConfig, QuantizedLinear, pack_int4

CUDA = torch.device("cuda")


@pytest.mark.parametrize(("scheme", "capability", "kernel", "expected"), [
    ("int4", (8, 0), True, None), ("int4", (7, 5), True, "int4 weights need a GPU of compute capability 8.0 or "
                                                          "newer; this one is 7.5"),
    ("int8", (9, 0), True, None), ("int8", (9, 0), False, "has no CUDA kernel for int8 weights"),
    ("fp8", (8, 9), True, None), ("fp8", (9, 0), True, None),
    ("fp8", (8, 6), True, "fp8 weights need a GPU of compute capability 8.9 or newer; this one is 8.6: use int8 "
                          "or int4"),
])
def test_each_scheme_runs_only_where_a_kernel_exists(scheme, capability, kernel, expected):
    problem = quant_cuda.device_problem(scheme, CUDA, capability, int8_kernel=kernel)
    assert problem == expected if expected is None else expected in problem


def test_fp8_on_a_cpu_is_refused_before_loading(tmp_path):
    with pytest.raises(InputError, match=r"fp8 weights need an NVIDIA GPU of compute capability 8\.9"):
        Qwen2Audio.from_pretrained(tmp_path / "never-read", device="cpu", quantization="fp8")


def test_tinygemm_takes_input_2j_in_the_high_nibble():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    expected = (codes[:, ::2] << 4) | codes[:, 1::2]  # torchao's packing for _convert_weight_to_int4pack
    assert torch.equal(quant_cuda.tinygemm_input(pack_int4(codes)), expected)


def test_scales_and_zeros_are_laid_out_groups_first():
    scales, zeros = torch.rand(6, 3), torch.rand(6, 3)
    laid = quant_cuda.scales_and_zeros(scales, zeros, torch.float32)
    assert laid.shape == (3, 6, 2)
    assert torch.equal(laid[2, 5], torch.stack([scales[5, 2], zeros[5, 2]]))


def test_fp8_activation_rows_round_trip_within_e4m3_precision():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 500.0, 1e4])[:, None]
    rows, scales = quant_cuda.fp8_rows(x)
    assert rows.dtype == torch.float8_e4m3fn and scales.shape == (5, 1)
    back = rows.float() * scales
    assert ((back - x).abs() <= x.abs() * 2**-3 + 1e-6).all()  # 3 mantissa bits: half an ulp is 1/16
    assert torch.allclose(rows.float().abs().amax(dim=1), torch.full((5,), 448.0))


def test_fp8_layer_against_its_hand_dequantized_weight():
    linear = torch.nn.Linear(128, 96)
    layer = QuantizedLinear.from_float(linear, QuantConfig("fp8"), dtype=torch.float32)
    assert layer.qweight.dtype == torch.float8_e4m3fn
    weight = layer.qweight.double() * layer.scales.double()[:, None] * layer.input_scale.double()
    x = torch.randn(3, 128)
    expected = x.double() @ weight.T + linear.bias.double()
    with torch.inference_mode():
        assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert ((weight - linear.weight.double()).abs() <= linear.weight.double().abs() / 8 + 1e-4).all()


def test_quantizing_from_host_rows_onto_another_device():
    """A loader streams a checkpoint's rows from host memory into layers on the GPU (meta stands in)."""
    layer = QuantizedLinear(64, 32, QuantConfig("int8"), device="meta")
    layer.quantize_from(lambda: [(0, torch.randn(32, 64))])
    assert layer.qweight.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 40])  # a decode row (int8's kernel) and a prefill chunk (int8's GEMM)
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_each_scheme_on_cuda_against_its_hand_dequantized_weight(scheme, rows):
    if quant_cuda.device_problem(scheme, CUDA):
        pytest.skip(quant_cuda.device_problem(scheme, CUDA))
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, device=CUDA)
    layer = QuantizedLinear.from_float(linear, QuantConfig(scheme), dtype=torch.bfloat16)
    weight = layer.dequantized(torch.float32)  # read before the first product repacks int4's codes
    x = torch.randn(rows, 256, device=CUDA)
    expected = x @ weight.T + linear.bias.detach()
    with torch.inference_mode():
        got = layer(x.to(torch.bfloat16)).float()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < (4e-2 if scheme == "fp8" else 1e-2)  # bf16 products; fp8 also rounds the activations
