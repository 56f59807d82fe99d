"""Quantized loading and `qwen2audio quantize`: layers quantized while a sharded checkpoint loads
equal layers quantized from the whole float weight; a written checkpoint loads without
re-quantizing and answers exactly as quantizing on load does; every bad request fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qwen2audio import EngineOptions, Qwen2Audio
from qwen2audio.cli import build_parser
from qwen2audio.errors import CheckpointError, InputError
from qwen2audio.model import quant
from qwen2audio.model.quant import QuantConfig, QuantizedLinear

from checkpoints import build_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # 200 KB shards put q, k and v (and gate, up) of a layer in different files.
    return build_checkpoint(tmp_path_factory.mktemp("float") / "ckpt", hidden=128, layers=2, shard="200KB")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2audio.cli", *args], capture_output=True, text=True,
                          timeout=300)


def clip_batch(model: Qwen2Audio):
    audio = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
    return model.processor([[{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                          {"type": "text", "text": "What is this?"}]}]])


@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 64)])
def test_layers_quantized_while_loading_equal_the_whole_weight_quantized(sharded, config):
    full = Qwen2Audio.from_pretrained(sharded, dtype="float32", progress=False,
                                      engine_options=EngineOptions(cpu_onednn=False))  # plain nn.Linear
    model = Qwen2Audio.from_pretrained(sharded, dtype="float32", progress=False, quantization=config)
    decoder, reference = model.network.language_model, full.network.language_model
    assert not any(isinstance(m, torch.nn.Linear) for m in decoder.model.layers.modules())  # no float copy kept
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        for index in range(2):
            got = decoder.model.layers[index].get_submodule(name)
            expected = QuantizedLinear.from_float(reference.model.layers[index].get_submodule(name), config,
                                                  torch.float32)
            assert (got._layout in ("cpu", "lanes")) == (config.scheme == "int4")  # laid out for a kernel when loaded
            for key, buffer in expected.named_buffers():
                value = got.saved_qweight() if key == "qweight" else dict(got.named_buffers())[key]
                assert torch.equal(value, buffer), (name, key)
    assert decoder.lm_head.config == quant.HEAD
    assert model.network.audio_tower.layers[0].fc1.weight.dtype == torch.float32  # the encoder stays float


def test_a_written_checkpoint_loads_as_saved_without_requantizing(sharded, tmp_path, monkeypatch):
    out = tmp_path / "int4"
    done = cli("quantize", "--model", str(sharded), "--quantization", "int4", "--quantization-group-size", "32",
               "--output", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "qwen2audio", "format_version": 1, "scheme": "int4", "group_size": 32,
                     "output_layer": "int8", "input_scales": True}
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    on_load = Qwen2Audio.from_pretrained(sharded, dtype="float32", progress=False, quantization="int4",
                                         quantization_group_size=32)
    batch = clip_batch(on_load)
    expected = on_load.logits(batch)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a saved checkpoint was quantized again")

    monkeypatch.setattr(QuantizedLinear, "_quantize_rows", refuse)
    for requested in (None, "int4"):
        loaded = Qwen2Audio.from_pretrained(out, dtype="float32", progress=False, quantization=requested,
                                            quantization_group_size=32 if requested else None)
        assert torch.equal(loaded.logits(batch), expected)
    # The file is smaller than the float one by what the codes save.
    float_bytes = sum(p.stat().st_size for p in sharded.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < 0.75 * float_bytes


def test_requantizing_differently_is_one_clear_error(sharded, tmp_path):
    out = tmp_path / "int8"
    assert cli("quantize", "--model", str(sharded), "-q", "int8", "--output", str(out), "--quiet").returncode == 0
    with pytest.raises(InputError, match=r"already quantized as int8 \(per channel\) and cannot be re-quantized "
                                         r"as int4 \(groups of 128\)"):
        Qwen2Audio.from_pretrained(out, quantization="int4", progress=False)
    done = cli("run", "--model", str(out), "-q", "int4", "--prompt", "hi", "--quiet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "already quantized" in done.stderr
    done = cli("quantize", "--model", str(out), "-q", "int4", "--output", str(tmp_path / "again"))
    assert done.returncode == 2 and "is already quantized (int8 (per channel)): quantize the original weights" \
        in done.stderr
    done = cli("quantize", "--model", str(sharded), "-q", "int4", "--output", str(out))
    assert done.returncode == 2 and "exists and is not an empty directory" in done.stderr


def test_bad_quantization_requests_fail_before_loading(sharded, tmp_path):
    tiny = build_checkpoint(tmp_path / "tiny", hidden=64)
    with pytest.raises(InputError, match=r"int4 groups of 128 do not divide the 64 inputs of the decoder's "
                                         r"self_attn\.qkv_proj: use a group size of 32 or 64, or int8"):
        Qwen2Audio.from_pretrained(tiny, quantization="int4", progress=False)
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quant_method 'gptq'.* is not a format this package reads"):
        Qwen2Audio.from_pretrained(tiny, progress=False)
    done = cli("run", "--model", str(sharded), "-q", "int3", "--prompt", "hi")
    assert done.returncode == 2 and "invalid choice: 'int3'" in done.stderr
    done = cli("run", "--model", str(sharded), "-q", "int8", "--quantization-group-size", "64", "--prompt", "hi")
    assert done.returncode == 2 and "a group size applies to int4 only" in done.stderr


@pytest.mark.parametrize("command", ["run", "chat", "transcribe", "serve", "eval"])
def test_every_model_command_takes_the_quantization_flags(command):
    extra = {"run": ["--model", "m"], "chat": ["--model", "m"], "transcribe": ["--model", "m", "a.wav"],
             "serve": ["m"], "eval": ["--model", "m", "--task", "librispeech-test-clean", "--data", "d"]}[command]
    args = build_parser().parse_args([command, *extra, "--quantization", "int4", "--quantization-group-size", "64"])
    assert (args.quantization, args.quantization_group_size) == ("int4", 64)
