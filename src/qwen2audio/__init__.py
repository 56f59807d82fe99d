"""qwen2audio: Qwen2-Audio inference from Python, the command line and HTTP."""

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
