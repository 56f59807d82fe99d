"""LoRA adapters against peft on transformers (the oracle): adapters made here with peft on the tiny
checkpoint, decoder only and decoder + audio tower + projector; greedy tokens alone and in one batch
with another adapter and the base model; fp32 logits; and every refusal a bad adapter gets."""

from __future__ import annotations

import json
import pathlib
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen2audio.api import Qwen2Audio
from qwen2audio.engine.options import EngineOptions
from qwen2audio.errors import AdapterError, AdapterNotFoundError

from checkpoints import build_checkpoint

peft = pytest.importorskip("peft")

RNG = np.random.default_rng(11)
CLIPS = [(RNG.standard_normal(int(s * 16000)) * 0.1).astype(np.float32) for s in (1.5, 3.0)]
DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT names layers by their last name: "fc1", "out_proj" and "linear" are the audio tower's and the projector's.
AUDIO = [*DECODER, "fc1", "fc2", "out_proj", "linear"]
NEW_TOKENS = 10


def conversation(clip: np.ndarray, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": question}]}]


PROMPTS = [conversation(CLIPS[0], "What is this?"), conversation(CLIPS[1], "Describe the sound.")]


def hf_model(checkpoint: pathlib.Path):
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager",
                                                              dtype=torch.float32).eval()


def make_adapter(checkpoint: pathlib.Path, directory: pathlib.Path, targets: list[str], seed: int,
                 r: int = 8, **config) -> pathlib.Path:
    """A peft adapter with random A and B (init_lora_weights=False: B is not zero), in PEFT's format."""
    torch.manual_seed(seed)
    lora = peft.LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 16), target_modules=targets,
                           init_lora_weights=False, **config)
    peft.get_peft_model(hf_model(checkpoint), lora).save_pretrained(directory)
    return directory


def oracle_model(checkpoint: pathlib.Path, adapter: pathlib.Path | None):
    model = hf_model(checkpoint)
    return peft.PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def oracle_inputs(checkpoint: pathlib.Path, items: list) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(item, add_generation_prompt=True, tokenize=False) for item in items]
    audios = [part["audio"] for item in items for part in item[0]["content"] if part["type"] == "audio"]
    return processor(text=texts, audio=audios, sampling_rate=16000, return_tensors="pt", padding=True)


def oracle_tokens(checkpoint: pathlib.Path, adapter: pathlib.Path | None, item: list) -> list[int]:
    model, inputs = oracle_model(checkpoint, adapter), oracle_inputs(checkpoint, [item])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    checkpoint = build_checkpoint(root / "ckpt", kv_heads=2, seed=5)
    adapters = {
        "dec": make_adapter(checkpoint, root / "dec", DECODER, seed=1),
        "audio": make_adapter(checkpoint, root / "audio", AUDIO, seed=2, r=4, lora_alpha=8, use_rslora=True),
    }
    expected = {(name, k): oracle_tokens(checkpoint, adapters.get(name), item)
                for name in ("dec", "audio", None) for k, item in enumerate(PROMPTS)}
    return checkpoint, adapters, expected


@pytest.fixture(scope="module")
def model(setup):
    checkpoint, adapters, _ = setup
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", dtype="float32", progress=False,
                                       engine_options=EngineOptions(max_loras=3, max_lora_rank=8))
    for name, path in adapters.items():
        model.load_adapter(path, name)
    return model


def test_the_adapters_change_the_replies(setup):
    _, _, expected = setup
    for k in range(len(PROMPTS)):
        assert expected["dec", k] != expected[None, k] and expected["audio", k] != expected[None, k]


@pytest.mark.parametrize("name", ["dec", "audio"])
def test_greedy_tokens_alone_equal_peft(setup, model, name):
    _, _, expected = setup
    for k, item in enumerate(PROMPTS):
        reply = model.chat(item, adapter=name, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0)
        assert reply.token_ids == expected[name, k]


def test_one_batch_of_two_adapters_and_the_base_equals_peft(setup, model):
    _, _, expected = setup
    prompts, wanted = [], []
    for k, item in enumerate(PROMPTS):
        for name in ("dec", "audio", None):
            prompts.append(replace(model.processor.prepare(item), adapter=name))
            wanted.append(expected[name, k])
    replies = model.generate_prepared(prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0)
    assert [r.token_ids for r in replies] == wanted
    assert model.engine.runner.encoder_cache.misses >= 4  # the audio adapter's clips are encoded apart


@pytest.mark.parametrize("name", ["dec", "audio"])
def test_fp32_logits_equal_peft(setup, model, name):
    checkpoint, adapters, _ = setup
    inputs = oracle_inputs(checkpoint, PROMPTS)
    with torch.no_grad():
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count from the text
        expected = oracle_model(checkpoint, adapters[name])(**inputs, position_ids=positions).logits
    got = model.logits(model.processor(PROMPTS), adapter=name)
    mask = inputs["attention_mask"].bool()
    relative = ((got[mask] - expected[mask]).abs().max() / expected[mask].abs().max()).item()
    assert relative <= 1e-5, relative
    base = model.logits(model.processor(PROMPTS))
    assert (base[mask] - expected[mask]).abs().max() > 100 * (got[mask] - expected[mask]).abs().max()


def test_loading_on_an_engine_without_slots_makes_them(setup):
    checkpoint, adapters, expected = setup
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", dtype="float32", progress=False)
    assert model.load_adapter(adapters["audio"]) == "audio"
    reply = model.chat(PROMPTS[1], adapter="audio", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       temperature=0)
    assert reply.token_ids == expected["audio", 1]
    assert model.adapters == ["audio"]
    model.unload_adapter("audio")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'audio'"):
        model.chat(PROMPTS[1], adapter="audio")
    assert model.chat(PROMPTS[1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      temperature=0).token_ids == expected[None, 1]


def edited(source: pathlib.Path, destination: pathlib.Path, config: dict | None = None,
           tensors=None) -> pathlib.Path:
    shutil.copytree(source, destination)
    if config:
        data = json.loads((destination / "adapter_config.json").read_text())
        (destination / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors:
        from safetensors.torch import load_file, save_file

        save_file(tensors(load_file(destination / "adapter_model.safetensors")),
                  destination / "adapter_model.safetensors")
    return destination


def renamed(old: str, new: str):
    return lambda tensors: {key.replace(old, new): value for key, value in tensors.items()}


def widened(tensors):
    return {key: torch.cat([value, value], dim=1) if "q_proj.lora_A" in key else value
            for key, value in tensors.items()}


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"use_dora": True}, None, r"DoRA \(use_dora\) is not supported"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"peft_type": "IA3"}, None, "a IA3 adapter; only LoRA"),
    ({"bias": "all"}, None, "trained biases"),
    (None, renamed("q_proj", "qq_proj"), "unknown target module .*qq_proj"),
    (None, renamed("language_model.layers.0.self_attn.q_proj", "language_model.embed_tokens"),
     "unknown target module .*embed_tokens.*not a linear layer but Embedding"),
    (None, widened, "shape mismatch at .*q_proj: lora_A .* another base model"),
])
def test_bad_adapters_are_refused_by_name(setup, model, tmp_path, config, tensors, message):
    _, adapters, _ = setup
    bad = edited(adapters["dec"], tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match=message):
        model.load_adapter(bad, "bad")
    assert "bad" not in model.adapters


def test_rank_over_the_limit_and_full_slots_and_names_are_refused(setup, model, tmp_path):
    checkpoint, adapters, _ = setup
    wide = make_adapter(checkpoint, tmp_path / "wide", ["q_proj"], seed=3, r=16)
    with pytest.raises(AdapterError, match=r"rank 16 at .* over this engine's max_lora_rank 8"):
        model.load_adapter(wide, "wide")
    with pytest.raises(AdapterError, match="already loaded"):
        model.load_adapter(adapters["dec"], "dec")
    model.load_adapter(adapters["dec"], "third")
    try:
        with pytest.raises(AdapterError, match="all 3 adapter slots are in use"):
            model.load_adapter(adapters["dec"], "fourth")
    finally:
        model.unload_adapter("third")
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        model.load_adapter(tmp_path, "empty")
