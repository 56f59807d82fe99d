"""LoRA adapters against peft on transformers (the oracle): adapters made here with peft on the tiny
checkpoint, decoder only and decoder + audio tower + projector; greedy tokens alone and in one batch
with another adapter and the base model; fp32 logits; and every refusal a bad adapter gets."""

from __future__ import annotations

import json
import pathlib
import shutil
from dataclasses import replace

import numpy as np
import peft
import pytest
import torch

from qwen2audio.api import Qwen2Audio
from qwen2audio.engine.options import EngineOptions
from qwen2audio.errors import AdapterError, AdapterNotFoundError

from checkpoints import build_checkpoint

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


def poisoned(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


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
    (None, poisoned, "values that are not finite"),
])
def test_bad_adapters_are_refused_by_name(setup, model, tmp_path, config, tensors, message):
    _, adapters, _ = setup
    bad = edited(adapters["dec"], tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match=message):
        model.load_adapter(bad, "bad")
    assert "bad" not in model.adapters


def test_damaged_files_and_requests_for_unknown_adapters_leave_nothing_behind(setup, model, tmp_path):
    _, adapters, _ = setup
    bad = edited(adapters["dec"], tmp_path / "json")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot be read as JSON"):
        model.load_adapter(bad, "json")
    bad = edited(adapters["dec"], tmp_path / "weights")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="cannot be read"):
        model.load_adapter(bad, "weights")
    engine = model.engine
    with pytest.raises(AdapterNotFoundError):
        engine.add_request(replace(model.processor.prepare(PROMPTS[0]), adapter="gone"))
    assert not engine.scheduler.requests and not engine.has_unfinished


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


def wav_base64(clip: np.ndarray) -> str:
    import base64
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, clip, 16000, format="WAV", subtype="FLOAT")  # float samples: the oracle's exactly
    return base64.b64encode(buffer.getvalue()).decode()


def sdk_messages(k: int) -> list[dict]:
    question = PROMPTS[k][0]["content"][1]["text"]
    return [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_base64(CLIPS[k]), "format": "wav"}},
        {"type": "text", "text": question}]}]


def test_server_serves_adapters_by_model_name_loads_and_unloads_them(setup):
    """The openai SDK against a live server: two adapters (one loaded at run time) and the base at
    once, each with its oracle's reply; /v1/models lists the adapters; unknown and unloaded: 404."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from qwen2audio.server.app import ServerOptions, create_app

    from serving import Running

    checkpoint, adapters, expected = setup
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", dtype="float32", progress=False,
                                       engine_options=EngineOptions(max_loras=2, max_lora_rank=8))
    model.load_adapter(adapters["dec"], "dec")
    running = Running(create_app(model, ServerOptions(served_model_name="base", api_key="secret")))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="secret", max_retries=0)
        url = running.url + "/v1/load_lora_adapter"
        body = {"lora_name": "audio", "lora_path": str(adapters["audio"])}
        assert httpx.post(url, json=body).status_code == 401  # behind the API key
        loaded = httpx.post(url, json=body, headers={"Authorization": "Bearer secret"})
        assert loaded.status_code == 200 and "audio" in loaded.text
        again = httpx.post(url, json=body, headers={"Authorization": "Bearer secret"})
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"base", "dec", "audio"}
        assert listed["dec"].parent == "base" and listed["dec"].root == str(adapters["dec"])

        def ask(job: tuple[str, int]) -> str:
            name, k = job
            reply = client.chat.completions.create(model=name, messages=sdk_messages(k), max_tokens=NEW_TOKENS,
                                                   temperature=0, extra_body={"min_tokens": NEW_TOKENS})
            return reply.choices[0].message.content

        jobs = [(name, k) for k in range(len(PROMPTS)) for name in ("dec", "audio", "base")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        decode = model.processor.tokenizer.decode
        assert got == [decode(expected[None if n == "base" else n, k], skip_special_tokens=True) for n, k in jobs]

        with pytest.raises(openai.NotFoundError, match=r"does not exist"):
            client.chat.completions.create(model="nope", messages=sdk_messages(0), max_tokens=2)
        unload = httpx.post(running.url + "/v1/unload_lora_adapter", json={"lora_name": "dec"},
                            headers={"Authorization": "Bearer secret"})
        assert unload.status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="dec", messages=sdk_messages(0), max_tokens=2)
        missing = httpx.post(running.url + "/v1/unload_lora_adapter", json={"lora_name": "dec"},
                             headers={"Authorization": "Bearer secret"})
        assert missing.status_code == 404
        bad = httpx.post(url, json={"lora_name": "bad", "lora_path": str(checkpoint)},
                         headers={"Authorization": "Bearer secret"})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert ask(("audio", 1)) == decode(expected["audio", 1], skip_special_tokens=True)  # still serving
        assert {m.id for m in client.models.list().data} == {"base", "audio"}
    finally:
        running.stop()


def test_mixed_batches_through_the_static_decoder_and_a_warm_prefix_cache(setup):
    """The fixed buffers CUDA graphs replay (run eagerly here), each row with its own slot; the base
    model's prompt blocks are cached first, and the adapters must not reuse them."""
    checkpoint, adapters, expected = setup
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", dtype="float32", progress=False,
                                       engine_options=EngineOptions(max_loras=2, max_lora_rank=8, static_decode=True,
                                                                    max_graph_batch=8))
    for name, path in adapters.items():
        model.load_adapter(path, name)
    assert model.engine.runner.static is not None
    sampling = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0}
    assert [model.chat(item, **sampling).token_ids for item in PROMPTS] == [expected[None, k] for k in range(2)]
    prompts = [replace(model.processor.prepare(item), adapter=name) for item in PROMPTS for name in ("audio", "dec")]
    replies = model.generate_prepared(prompts, **sampling)
    assert [r.token_ids for r in replies] == [expected[name, k] for k in range(2) for name in ("audio", "dec")]


def test_cli_lora_option(setup, tmp_path, capsys):
    import soundfile

    from qwen2audio import cli

    checkpoint, adapters, expected = setup
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, CLIPS[1], 16000, subtype="FLOAT")
    common = ["--model", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--quiet"]
    question = PROMPTS[1][0]["content"][1]["text"]
    capsys.readouterr()
    assert cli.main(["run", *common, "--lora", str(adapters["audio"]), "--audio", str(wav), "--prompt", question,
                     "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["token_ids"]
    assert ids and ids == expected["audio", 1][:len(ids)]  # the oracle's, up to an end token it was kept from
    assert cli.main(["run", *common, "--lora", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--lora" in error and "nowhere" in error


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-modules", "nameonly"], "give NAME=PATH"),
    (["--lora-modules", "a=x", "b=y", "--max-loras", "1"], "--max-loras 1 holds fewer adapters than the 2"),
    (["--lora-modules", "a=x", "a=y"], "names an adapter twice"),
    (["--lora-modules", "a=x", "--replicas", "2"], "served by one engine"),
])
def test_serve_lora_flags_are_checked_before_loading(tmp_path, capsys, flags, message):
    from qwen2audio import cli

    try:
        code = cli.main(["serve", str(tmp_path / "never-read"), "--device", "cpu", *flags])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
