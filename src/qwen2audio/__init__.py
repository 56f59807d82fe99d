"""qwen2audio: Qwen2-Audio inference from Python, the command line and HTTP."""

from qwen2audio.api import Completion, Qwen2Audio, TextDelta
from qwen2audio.audio import FeatureExtractor, load_audio
from qwen2audio.engine.request import SamplingParams
from qwen2audio.errors import AudioError, CheckpointError, InputError, PromptError
from qwen2audio.processor import Processor

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "Completion",
    "FeatureExtractor",
    "InputError",
    "Processor",
    "PromptError",
    "Qwen2Audio",
    "SamplingParams",
    "TextDelta",
    "load_audio",
]
