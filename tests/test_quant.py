"""Weight-only int8/int4: each layer against a reference dequantized by hand from its own codes with
the documented formulas (both paths: integer kernels for decode rows, a GEMM for prefill chunks),
torch's own int4 packing as the reference for ours, and a whole model with trained-looking weights
against the unquantized one (logits and greedy tokens)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from qwen2audio import Qwen2Audio
from qwen2audio.errors import InputError
from qwen2audio.model import quant
from qwen2audio.model.quant import (
    DECODE_ROWS,
    QuantConfig,
    QuantizedLinear,
    pack_int4,
    unpack_int4,
)

from checkpoints import build_checkpoint

CONFIGS = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64), QuantConfig("int4", 128)]


def trained_looking(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    """Heavy-tailed rows with a few outlier input channels, as trained weights have."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weight = torch.distributions.StudentT(3.0).sample((out_features, in_features)) * 0.02
    weight[:, torch.randperm(in_features, generator=generator)[:4]] *= 8
    linear = nn.Linear(in_features, out_features, bias=True)
    linear.weight.data, linear.bias.data = weight, torch.randn(out_features, generator=generator) * 0.1
    return linear


def by_hand(layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(W / s, its quantization step per element), float64, from the stored bytes alone."""
    out, inputs = layer.out_features, layer.in_features
    if layer.config.scheme == "int8":
        scales = layer.scales.double()[:, None]
        return layer.qweight.double() * scales, scales.expand(out, inputs)
    g = layer.config.group_size
    packed = layer.qweight
    codes = torch.empty(out, inputs, dtype=torch.float64)
    codes[:, 0::2], codes[:, 1::2] = (packed & 15).double(), (packed >> 4).double()
    scales = layer.scales.double().repeat_interleave(g, 1)
    return (codes - 8) * scales + layer.zeros.double().repeat_interleave(g, 1), scales


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("rows", [1, 5, DECODE_ROWS + 1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_layer_against_its_hand_dequantized_weight(config, rows, dtype):
    linear = trained_looking(192, 256)
    layer = QuantizedLinear.from_float(linear, config, dtype=dtype)
    scaled, step = by_hand(layer)
    s = layer.input_scale.double()
    # Codes are the nearest of their grid to W / s (the grid's ends clamp, so the bound is a step there).
    assert ((linear.weight.double() / s - scaled).abs() <= step * 0.5001 + 1e-9).float().mean() > 0.999
    reference = scaled * s
    x = torch.randn(rows, 256)
    expected = x.to(dtype).double() @ reference.T + linear.bias.double()
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (rows, 192) and got.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if dtype == torch.float32 and layer._layout == "lanes" and rows <= DECODE_ROWS:
        tolerance = 6e-5  # our int4 kernel's two levels of activation codes: about 2e-5
    assert ((got.double() - expected).norm() / expected.norm()).item() < tolerance


def test_the_input_scale_takes_outlier_channels_out_of_the_rows(monkeypatch):
    """A few large input channels would set every row's step; folded into the input, the error shrinks."""
    linear = trained_looking(256, 512, seed=3)
    x = torch.randn(8, 512)
    expected = linear(x).detach()

    def error(config: QuantConfig) -> float:
        layer = QuantizedLinear.from_float(linear, config, dtype=torch.float32)
        got = nn.functional.linear(x, layer.dequantized(), linear.bias)
        return ((got - expected).norm() / expected.norm()).item()

    for config, at_most in ((QuantConfig("int8"), 0.015), (QuantConfig("int4", 128), 0.15)):
        folded = error(config)
        with monkeypatch.context() as patch:
            patch.setattr(quant, "EQUALIZE_POWER", 0.0)  # every input scale 1: plain round-to-nearest
            plain = error(config)
        assert folded < at_most and folded < 0.8 * plain, (config, folded, plain)


INT4_LAYOUT_CHECK = """
import torch
from qwen2audio.model.quant import (QuantConfig, QuantizedLinear, cpu_int4_codes, cpu_int4_format,
                                    cpu_int4_layout, pack_int4)
layout = cpu_int4_format()
codes = torch.randint(0, 16, (192, 256), dtype=torch.uint8)
expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1).view(torch.uint8)
assert torch.equal(cpu_int4_layout(pack_int4(codes), layout), expected.reshape(192, 128))
assert torch.equal(cpu_int4_codes(expected.reshape(192, 128), layout), codes)
layer = QuantizedLinear.from_float(torch.nn.Linear(256, 192), QuantConfig("int4", 64), torch.float32)
layer.prepare()
x = torch.randn(1, 256)
reference = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
assert layer._layout == "cpu" and ((layer(x) - reference).abs().max() / reference.abs().max()) < 1e-5
print(torch.backends.cpu.get_cpu_capability(), layout)
"""


@pytest.mark.parametrize("capability", ["avx512", "avx2", "default"])
def test_our_int4_layout_is_torchs_on_each_cpu_build(capability):
    """torch's CPU int4 kernel reads a different layout per CPU build; each is found and used right
    (ATEN_CPU_CAPABILITY picks the build's kernels, as a CPU without AVX-512 or AVX2 would)."""
    assert torch.equal(unpack_int4(pack_int4(codes := torch.randint(0, 16, (8, 64), dtype=torch.uint8))), codes)
    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "QWEN2AUDIO_CPU_KERNELS": "0"}  # torch's kernel
    done = subprocess.run([sys.executable, "-c", INT4_LAYOUT_CHECK], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == capability.upper()


def test_pieces_in_any_order_and_dtype_equal_the_whole():
    """A fused weight (qkv, gate_up) arrives as separate checkpoint tensors, streamed in slices."""
    linear = trained_looking(96, 128, seed=1)
    weight = linear.weight.detach().to(torch.bfloat16)  # as a bf16 checkpoint stores it
    for config in (QuantConfig("int8"), QuantConfig("int4", 32)):
        whole = QuantizedLinear.from_float(nn.Linear(128, 96).requires_grad_(False), config)
        whole.quantize_from(lambda: [(0, weight.float())])
        pieces = QuantizedLinear(128, 96, config)
        pieces.quantize_from(lambda: [(40, weight[40:70]), (70, weight[70:]), (0, weight[:40])])
        for name, buffer in whole.named_buffers():
            assert torch.equal(buffer, dict(pieces.named_buffers())[name]), name


def test_bad_schemes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, fp8, not 'int3'"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="group size must be one of 32, 64, 128, not 100"):
        QuantConfig("int4", 100)
    with pytest.raises(ValueError, match="groups of 128 do not divide a layer of 96 inputs"):
        QuantizedLinear(96, 64, QuantConfig("int4", 128))


# --- the whole model --------------------------------------------------------------------------------

TEXT = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 2}
AUDIO = {"d_model": 128, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 256}
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("trained") / "mid", text_dims=TEXT, audio_dims=AUDIO,
                            real_vocab=True, trained_looking=True)


def conversations() -> list:
    rng = np.random.default_rng(0)
    questions = ["Describe this sound.", "What is the speaker saying?", "Is there music here?",
                 "How many people are talking?", "What language is this?", "Summarise the clip.",
                 "What emotion do you hear?", "Where was this recorded?"]
    return [[{"role": "user", "content": [
        {"type": "audio", "audio": (rng.standard_normal(16000 * (1 + k % 3)) * 0.1).astype(np.float32)},
        {"type": "text", "text": question}]}] for k, question in enumerate(questions)]


def with_continuations(batch, continuations: list[list[int]]):
    """The batch with each row's generated tokens appended (teacher forcing), left padded again."""
    rows = [ids + more for ids, more in zip(batch.token_ids, continuations, strict=True)]
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    return dataclasses.replace(batch, input_ids=input_ids, attention_mask=mask, token_ids=rows)


@pytest.fixture(scope="module")
def float_reference(trained_checkpoint):
    model = Qwen2Audio.from_pretrained(trained_checkpoint, device="cpu", dtype="float32", progress=False)
    convs = conversations()
    replies = model.generate(convs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0.0)
    batch = with_continuations(model.processor(convs), [reply.token_ids for reply in replies])
    return batch, model.logits(batch)


@pytest.mark.parametrize(("scheme", "group", "max_error", "min_agreement"),
                         [("int8", None, 0.01, 0.95), ("int4", 128, 0.05, 0.80)])
def test_quantized_model_against_the_float_one(trained_checkpoint, float_reference, scheme, group, max_error,
                                               min_agreement):
    """Logits within ``max_error`` (relative L2 at every position) and the greedy token at each of
    the 64 generated positions of 8 prompts equal to the float model's on ``min_agreement`` of them,
    both models reading the float model's greedy continuation (a single early tie would otherwise
    decide all the rest)."""
    batch, reference = float_reference
    model = Qwen2Audio.from_pretrained(trained_checkpoint, device="cpu", dtype="float32", progress=False,
                                       quantization=scheme, quantization_group_size=group)
    got = model.logits(batch)
    mask = batch.attention_mask.bool()
    errors = (got[mask] - reference[mask]).norm(dim=-1) / reference[mask].norm(dim=-1)
    generated = torch.zeros_like(mask)
    generated[:, -NEW_TOKENS - 1:-1] = True  # the positions that predict the 64 generated tokens
    agreement = (got[generated].argmax(-1) == reference[generated].argmax(-1)).float().mean().item()
    assert errors.max().item() < max_error and agreement >= min_agreement, (errors.max().item(), agreement)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_decode_through_the_cpu_kernels_agrees_with_prefill(trained_checkpoint, scheme):
    """The logits test above reads whole sequences, which take the dequantized GEMM; generated tokens
    take the decode kernels (int8 activation codes for int4 in bfloat16, model/cpu_kernels.py). Each
    greedy token must be what the same model's prefill over the same sequence ranks first, but for
    near-ties."""
    model = Qwen2Audio.from_pretrained(trained_checkpoint, device="cpu", dtype="bfloat16", progress=False,
                                       quantization=scheme)
    convs = conversations()
    replies = model.generate(convs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0.0)
    batch = with_continuations(model.processor(convs), [reply.token_ids for reply in replies])
    logits = model.logits(batch)
    predicted = logits[:, -NEW_TOKENS - 1:-1].argmax(-1)
    agreement = (predicted == batch.input_ids[:, -NEW_TOKENS:]).float().mean().item()
    assert agreement >= 0.95, agreement


def test_quantized_loading_refuses_bad_requests(trained_checkpoint):
    with pytest.raises(InputError, match="quantization must be one of int8, int4, fp8, not 'int2'"):
        Qwen2Audio.from_pretrained(trained_checkpoint, quantization="int2", progress=False)
    with pytest.raises(InputError, match="a group size applies to int4 only"):
        Qwen2Audio.from_pretrained(trained_checkpoint, quantization="int8", quantization_group_size=64,
                                   progress=False)
    with pytest.raises(InputError, match="group size must be one of 32, 64, 128, not 48"):
        Qwen2Audio.from_pretrained(trained_checkpoint, quantization="int4", quantization_group_size=48,
                                   progress=False)


@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32)])
def test_prefill_in_row_slices_and_after_repacking(monkeypatch, config):
    """Large layers dequantize a slice of rows at a time; int4 codes repacked for a CPU kernel
    (on the first decode step) still dequantize, and save, as before."""
    linear = trained_looking(320, 128, seed=2)
    layer = QuantizedLinear.from_float(linear, config, dtype=torch.float32)
    saved = layer.qweight.clone()
    x = torch.randn(DECODE_ROWS + 3, 128)
    with torch.inference_mode():
        whole = layer(x)
        monkeypatch.setattr(quant, "_DEQUANT_ELEMENTS", 128 * 64)  # slices of 64 rows
        layer(x[:1])  # a decode row: int4 repacks in place
        sliced = layer(x)
    assert torch.allclose(whole, sliced, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.saved_qweight(), saved)
    assert (layer._layout in ("cpu", "lanes")) == (config.scheme == "int4")
