"""qwen2audio: Qwen2-Audio inference from Python, the command line and HTTP."""

from qwen2audio.audio import FeatureExtractor, load_audio
from qwen2audio.errors import AudioError, InputError, PromptError

__version__ = "0.1.0"

__all__ = ["AudioError", "FeatureExtractor", "InputError", "PromptError", "load_audio"]
