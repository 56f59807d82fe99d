"""Audio at the edge: decoding (io) and log-mel features (features)."""

from qwen2audio.audio.features import AudioFeatures, FeatureConfig, FeatureExtractor, audio_token_count, frame_count
from qwen2audio.audio.io import UrlPolicy, load_audio

__all__ = [
    "AudioFeatures",
    "FeatureConfig",
    "FeatureExtractor",
    "UrlPolicy",
    "audio_token_count",
    "frame_count",
    "load_audio",
]
