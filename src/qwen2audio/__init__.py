"""qwen2audio: Qwen2-Audio inference from Python, the command line and HTTP.

The names below load on first use (PEP 562), so that ``import qwen2audio.<module>`` for a piece
that needs no model (a Ray job's driver, ``qwen2audio --help``, the CPU stage of a batch job)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen2audio.api import Completion, Qwen2Audio, TextDelta, parse_quantization
    from qwen2audio.audio.features import FeatureExtractor
    from qwen2audio.audio.io import DEFAULT_MAX_DURATION_S, load_audio
    from qwen2audio.audio.segment import SEGMENTATIONS, plan_windows
    from qwen2audio.config import SAMPLE_RATE
    from qwen2audio.engine.options import EngineOptions
    from qwen2audio.engine.request import SamplingParams
    from qwen2audio.errors import AudioError, CheckpointError, ContextLengthError, InputError, PromptError
    from qwen2audio.hub import checkpoint_identity
    from qwen2audio.model.quant import QuantConfig
    from qwen2audio.processor import Processor
    from qwen2audio.quantize import quantize_checkpoint
    from qwen2audio.text.prompt import AUDIO_PLACEHOLDER, AUDIO_TOKEN

__version__ = "0.1.0"

_HOMES = {
    "qwen2audio.api": ("Completion", "Qwen2Audio", "TextDelta", "parse_quantization"),
    "qwen2audio.audio.features": ("FeatureExtractor",),
    "qwen2audio.audio.io": ("DEFAULT_MAX_DURATION_S", "load_audio"),
    "qwen2audio.audio.segment": ("SEGMENTATIONS", "plan_windows"),
    "qwen2audio.config": ("SAMPLE_RATE",),
    "qwen2audio.engine.options": ("EngineOptions",),
    "qwen2audio.engine.request": ("SamplingParams",),
    "qwen2audio.errors": ("AudioError", "CheckpointError", "ContextLengthError", "InputError", "PromptError"),
    "qwen2audio.hub": ("checkpoint_identity",),
    "qwen2audio.model.quant": ("QuantConfig",),
    "qwen2audio.processor": ("Processor",),
    "qwen2audio.quantize": ("quantize_checkpoint",),
    "qwen2audio.text.prompt": ("AUDIO_PLACEHOLDER", "AUDIO_TOKEN"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AUDIO_PLACEHOLDER",
    "AUDIO_TOKEN",
    "DEFAULT_MAX_DURATION_S",
    "SAMPLE_RATE",
    "SEGMENTATIONS",
    "AudioError",
    "CheckpointError",
    "Completion",
    "ContextLengthError",
    "EngineOptions",
    "FeatureExtractor",
    "InputError",
    "Processor",
    "PromptError",
    "QuantConfig",
    "Qwen2Audio",
    "SamplingParams",
    "TextDelta",
    "checkpoint_identity",
    "load_audio",
    "parse_quantization",
    "plan_windows",
    "quantize_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2audio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
