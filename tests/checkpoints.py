"""Tiny random Qwen2-Audio checkpoints in the real Hugging Face layout, built at test time.

transformers (the oracle) writes them, so their layout is the reference's, not ours.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import pathlib
import re
import shutil

import pytest
import torch

DATA = pathlib.Path(__file__).parent / "data"
PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def oracle_versions() -> tuple[str, str | None]:
    """(the transformers version the test extras pin, the installed one or None)."""
    pin = re.search(r'"transformers==([^"]+)"', PYPROJECT.read_text(encoding="utf-8")).group(1)
    try:
        return pin, importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return pin, None


_PIN, _INSTALLED = oracle_versions()
# transformers 5.16 stopped wrapping a bare <|AUDIO|> in <|audio_bos|>/<|audio_eos|> in raw prompts;
# tests whose expected value comes from that behaviour hold only on the pinned version.
PINNED_ORACLE = pytest.mark.skipif(
    _INSTALLED not in (None, _PIN),
    reason=f"the expected value is transformers {_PIN}'s (its processor wraps a bare <|AUDIO|> in "
           f"<|audio_bos|>/<|audio_eos|>; 5.16+ does not); transformers {_INSTALLED} is installed",
)
_BARE_AUDIO = re.compile(r"(?<!<\|audio_bos\|>)<\|AUDIO\|>")
ORACLE_IS_PINNED = _INSTALLED is None or _INSTALLED == _PIN


def has_bare_audio(prompt: object) -> bool:
    """Whether a raw prompt holds an <|AUDIO|> without <|audio_bos|> right before it, which the
    pinned processor wraps and newer ones leave alone (measured with 5.24)."""
    return isinstance(prompt, str) and bool(_BARE_AUDIO.search(prompt))
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Detect the language and recognize the speech: <|en|> Generate the caption in English:",
    "You are a helpful assistant. Audio 1: Audio 2: What does the person say? And this one?",
    "今天天气很好，我们去公园散步吧。日本語のテキスト。 emoji 😀 🎉 code: def f(x): return x**2",
    "system user assistant \n\n  tabs\t and spaces   numbers 0123456789 !?.,;:'\"()[]{}",
]


def build_tiny_tokenizer(directory: pathlib.Path, vocab_size: int = 400) -> int:
    """Train a byte-level BPE with the Qwen2 pre-tokenizer; write vocab.json, merges.txt and
    tokenizer_config.json with the six special tokens right after the vocabulary. Returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from qwen2audio.text.tokenizer import QWEN2_SPLIT

    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    size = tokenizer.get_vocab_size()
    real = json.loads((DATA / "qwen2-tokenizer" / "tokenizer_config.json").read_text())
    config = dict(real)
    config["added_tokens_decoder"] = {
        str(size + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return size


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """std ~0.1 weights so outputs depend on inputs (the default init is far too small)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # The projector's output lands beside text embeddings of std 0.1: keep it on that scale,
            # or the audio swamps the prompt and every reply repeats one token.
            scale = 0.02 if "multi_modal_projector" in name else (0.5 if "embed_tokens" in name else 0.1)
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def _trained_looking(model: torch.nn.Module, seed: int) -> None:
    """Weights shaped like a trained model's, for quantization tests: decoder rows Student-t (5
    degrees of freedom, heavy tails) with 1% of input channels four times larger (the outlier
    channels trained transformers have), each block adding about a quarter of the residual stream's
    size (random unit-gain blocks would make every output chaotic in its input; trained ones refine a
    stream dominated by the token embedding), audio projected to the embeddings' scale."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT samples from the global generator
    student = torch.distributions.StudentT(5.0)
    hidden = model.config.text_config.hidden_size
    outliers = torch.randperm(hidden, generator=generator)[: max(1, hidden // 100)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            decoder = "language_model" in name
            if decoder and param.dim() == 2 and "embed_tokens" not in name:
                weight = student.sample(param.shape)
                weight *= (0.25 if "lm_head" not in name else 1.0) / weight.std() / param.shape[1] ** 0.5
                columns = outliers if param.shape[1] == hidden else \
                    torch.randperm(param.shape[1], generator=generator)[: max(1, param.shape[1] // 100)]
                if "lm_head" not in name:
                    weight[:, columns] *= 4
                param.copy_(weight)
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "multi_modal_projector" in name and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.02 if decoder else 0.1))


def build_checkpoint(
    directory: pathlib.Path,
    *,
    kv_heads: int = 2,
    tie: bool = False,
    shard: str | None = None,
    tokenizer_json: bool = False,
    seed: int = 0,
    real_vocab: bool = False,
    hidden: int = 64,
    layers: int = 2,
    text_dims: dict | None = None,
    audio_dims: dict | None = None,
    randomize: bool = True,
    trained_looking: bool = False,
) -> pathlib.Path:
    """Save a tiny model + processor files in the real layout. GQA when kv_heads < 4.

    ``text_dims`` / ``audio_dims`` override the sub-configs (benchmarks use mid-size models)."""
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tok_dir = directory / "_tokenizer"
    if real_vocab:
        shutil.copytree(DATA / "qwen2-tokenizer", tok_dir)
        base = 151643
    else:
        base = build_tiny_tokenizer(tok_dir)
    audio_config = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
                    "num_mel_bins": 128, "max_source_positions": 1500, **(audio_dims or {})}
    text_config = {"vocab_size": base + 16, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                   "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "tie_word_embeddings": tie, "bos_token_id": base, "eos_token_id": base + 2, **(text_dims or {})}
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_index=base + 3,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    if trained_looking:
        _trained_looking(model, seed)
    elif randomize:
        _randomize(model, seed)
    if tie:
        # transformers 5.15 keeps a separate lm_head even when the config ties it; making the two
        # equal lets the oracle and a loader that honours the tie agree.
        with torch.no_grad():
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer,
                                    chat_template=tokenizer.chat_template)
    processor.save_pretrained(directory)
    if not tokenizer_json:
        (directory / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, directory / name)
    shutil.rmtree(tok_dir)
    return directory


@functools.cache
def oracle(checkpoint: pathlib.Path):
    """transformers' model (fp32, eager attention) and processor for a checkpoint, loaded once per session."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def greedy_oracle(checkpoint: pathlib.Path, default_tokens: int = 12):
    """transformers' greedy reply to one conversation or raw prompt: (text, token ids), fp32 eager."""
    from qwen2audio import load_audio

    model, processor = oracle(checkpoint)

    def reply(item, audios, max_new_tokens: int = default_tokens):
        text = item if isinstance(item, str) else processor.apply_chat_template(
            item, add_generation_prompt=True, tokenize=False)
        kwargs = {"audio": [load_audio(a) for a in audios], "sampling_rate": 16000} if audios else {}
        inputs = processor(text=[text], return_tensors="pt", **kwargs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        ids = out[0, inputs.input_ids.shape[1]:].tolist()
        return processor.tokenizer.decode(ids, skip_special_tokens=True), ids

    return reply


def write_lora(directory: pathlib.Path, checkpoint: pathlib.Path, rank: int, seed: int, audio: bool = False,
               scale: float = 0.05) -> pathlib.Path:
    """A random LoRA adapter in PEFT's file layout (transformers 5 module names) for ``checkpoint``:
    rank ``rank`` on every projection of the decoder, and with ``audio`` on the audio tower's fc1
    and the projector too. A ~ N(0, 1/in), B ~ N(0, scale^2); alpha = 2 * rank."""
    config = json.loads((checkpoint / "config.json").read_text())
    text, tower = config["text_config"], config["audio_config"]
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    kv = hidden // text["num_attention_heads"] * text["num_key_value_heads"]
    decoder = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
               "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
               "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    shapes = {f"model.language_model.layers.{n}.{name}": dims
              for n in range(text["num_hidden_layers"]) for name, dims in decoder.items()}
    if audio:
        shapes.update({f"model.audio_tower.layers.{n}.fc1": (tower["d_model"], tower["encoder_ffn_dim"])
                       for n in range(tower["encoder_layers"])})
        shapes["model.multi_modal_projector.linear"] = (tower["d_model"], hidden)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (inputs, outputs) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) / inputs**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) * scale
    directory.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(tensors, directory / "adapter_model.safetensors")
    targets = sorted({module.rsplit(".", 1)[1] for module in shapes})
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}))
    return directory
