"""Frozen configuration read once from a checkpoint's config.json (SPEC.md section 3).

Owns the Qwen2 and Whisper-encoder defaults for fields a checkpoint leaves out; nothing here is
ever written back. Values found at run time (KV blocks, eos ids) live on the objects that find them.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qwen2audio.errors import CheckpointError

MODEL_TYPE = "qwen2_audio"
SAMPLE_RATE = 16_000  # Hz: what the Whisper-style encoder hears; every clip is resampled to it


class ConfigError(CheckpointError):
    """config.json is missing, unreadable or describes a model this package does not implement."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The Whisper-style encoder (``audio_config``)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (``text_config``); defaults are Qwen2's, as transformers applies them."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    head_dim: int = 128


@dataclass(frozen=True)
class ModelConfig:
    """The whole checkpoint: encoder, decoder, and the audio placeholder id."""

    audio: AudioEncoderConfig
    text: TextConfig
    audio_token_id: int = 151646
    quantization: Mapping[str, Any] | None = None  # config.json's quantization_config, as written

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the output head reuses the embedding matrix (read once into the decoder's config)."""
        return self.text.tie_word_embeddings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config.json has model_type {model_type!r}; this package implements {MODEL_TYPE!r}")
        audio = _audio_config(data.get("audio_config") or {})
        text_data = dict(data.get("text_config") or {})
        tie = bool(text_data.get("tie_word_embeddings", data.get("tie_word_embeddings", False)))
        text = _text_config(text_data, tie)
        audio_token_id = int(data.get("audio_token_index", data.get("audio_token_id", 151646)))
        return cls(audio=audio, text=text, audio_token_id=audio_token_id,
                   quantization=data.get("quantization_config"))

    @classmethod
    def from_dir(cls, directory: str | pathlib.Path) -> ModelConfig:
        path = pathlib.Path(directory) / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Qwen2-Audio checkpoint directory?)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config.json ({exc})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults and end tokens from ``generation_config.json``: what a request gets for a
    field it leaves unset. ``None`` leaves the engine's own default (see SamplingParams)."""

    eos_token_ids: frozenset[int]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], fallback_eos: int) -> GenerationConfig:
        """``do_sample`` false (or absent) means greedy, whatever temperature the file gives; end
        tokens come from the tokenizer when the file names none."""
        eos = data.get("eos_token_id", fallback_eos)
        values = {name: data.get(name) for name in SAMPLING_DEFAULT_FIELDS}
        if not data.get("do_sample", False):
            values["temperature"] = 0.0
        return cls(eos_token_ids=frozenset(eos if isinstance(eos, list) else [eos]), **values)

    @classmethod
    def from_dir(cls, directory: str | pathlib.Path | None, fallback_eos: int) -> GenerationConfig:
        path = pathlib.Path(directory) / "generation_config.json" if directory is not None else None
        if path is None or not path.is_file():
            return cls.from_dict({}, fallback_eos)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), fallback_eos)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read generation_config.json ({exc})") from None

    def defaults(self) -> dict[str, Any]:
        """The sampling fields this checkpoint sets (the ones left None are not in it)."""
        return {name: getattr(self, name) for name in SAMPLING_DEFAULT_FIELDS if getattr(self, name) is not None}


SAMPLING_DEFAULT_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def _audio_config(data: Mapping[str, Any]) -> AudioEncoderConfig:
    config = AudioEncoderConfig(**_known(AudioEncoderConfig, data))
    if config.activation_function != "gelu":
        raise ConfigError(f"audio_config.activation_function {config.activation_function!r} is not supported (gelu)")
    if config.d_model % config.encoder_attention_heads:
        raise ConfigError("audio_config: d_model is not a multiple of encoder_attention_heads")
    return config


def _text_config(data: dict[str, Any], tie: bool) -> TextConfig:
    values = _known(TextConfig, data)
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"text_config: rope type {rope_type!r} is not supported (default RoPE only)")
    if "rope_theta" in rope:
        values["rope_theta"] = float(rope["rope_theta"])
    heads = int(values.get("num_attention_heads", TextConfig.num_attention_heads))
    values.setdefault("num_key_value_heads", heads)
    hidden = int(values.get("hidden_size", TextConfig.hidden_size))
    if data.get("head_dim") is None:
        values["head_dim"] = hidden // heads
    values["tie_word_embeddings"] = tie
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"text_config.hidden_act {data['hidden_act']!r} is not supported (silu)")
    if data.get("use_sliding_window"):
        raise ConfigError("text_config.use_sliding_window is set; sliding-window attention is not supported")
    config = TextConfig(**values)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError("text_config: num_attention_heads is not a multiple of num_key_value_heads")
    return config


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = set(cls.__dataclass_fields__)
    return {key: value for key, value in data.items() if key in names and value is not None}
