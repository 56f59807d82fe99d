"""Log-mel features against transformers' WhisperFeatureExtractor, and the token-count formula."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2audio import AudioError, load_audio
from qwen2audio.audio.features import (
    FeatureConfig,
    FeatureExtractor,
    audio_token_count,
    frame_count,
    mel_filter_bank,
)

DATA = pathlib.Path(__file__).parent / "data"
EXTRACTOR = FeatureExtractor()


def oracle_features(oracle, clips):
    out = oracle(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    return out.input_features, out.attention_mask.long()


def assert_matches_oracle(oracle, clips) -> None:
    expected, expected_mask = oracle_features(oracle, clips)
    got = EXTRACTOR(clips)
    assert got.input_features.shape == expected.shape
    assert (got.input_features - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.feature_attention_mask, expected_mask)


@pytest.mark.parametrize(
    "name", ["speech_en_16k.wav", "speech_zh_16k.wav", "question_en_16k.wav", "tone_440hz_3s.wav", "silence_2s.wav"]
)
def test_shipped_clips_match_the_oracle(whisper_oracle, name: str) -> None:
    assert_matches_oracle(whisper_oracle, [load_audio(DATA / name)])


def test_a_mixed_batch_matches_the_oracle(whisper_oracle) -> None:
    rng = np.random.default_rng(1)
    clips = [load_audio(DATA / "speech_en_16k.wav"), rng.uniform(-1, 1, 480000).astype(np.float32),
             rng.normal(0, 0.01, 481).astype(np.float32), np.zeros(16000, np.float32),
             rng.uniform(-1, 1, 479_900).astype(np.float32)]
    assert_matches_oracle(whisper_oracle, clips)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_samples=st.integers(min_value=480, max_value=480_000), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-4, 0.05, 1.0]))
def test_random_lengths_match_the_oracle(whisper_oracle, n_samples: int, seed: int, scale: float) -> None:
    clip = (np.random.default_rng(seed).standard_normal(n_samples) * scale).clip(-1, 1).astype(np.float32)
    assert_matches_oracle(whisper_oracle, [clip])


def test_mel_filter_bank_equals_the_oracles(whisper_oracle) -> None:
    np.testing.assert_allclose(mel_filter_bank(), whisper_oracle.mel_filters, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "seconds,tokens",
    # SPEC.md section 4: 1 s -> 25, 4.03 s -> 101, 30 s -> 750; 20 ms or less -> none.
    [(1.0, 25), (4.03, 101), (30.0, 750), (0.02, 0), (0.021, 1), (0.03, 1), (0.01, 0)],
)
def test_token_count_formula(seconds: float, tokens: int) -> None:
    assert audio_token_count(frame_count(round(seconds * 16000))) == tokens


def test_long_audio_is_split_not_truncated() -> None:
    clip = load_audio(DATA / "chirp_40s_22k.wav")  # 40 s -> 30 s + 10 s windows
    features = EXTRACTOR([clip])
    assert features.window_counts == [2]
    assert features.window_tokens == [750, 250]
    assert features.token_counts == [1000]
    assert features.input_features.shape == (2, 128, 3000)
    assert features.feature_attention_mask.sum(dim=1).tolist() == [3000, 1000]
    # Each window is featurized like a clip of its own.
    first, second = clip[:480000], clip[480000:]
    single = EXTRACTOR([first, second])
    assert torch.equal(single.input_features, features.input_features)


def test_a_tail_too_short_for_a_token_is_dropped() -> None:
    windows = EXTRACTOR.plan(np.zeros(480000 + 320, np.float32))
    assert [w.end - w.start for w in windows] == [480000]
    windows = EXTRACTOR.plan(np.zeros(480000 + 321, np.float32))
    assert [w.end - w.start for w in windows] == [480000, 321]


def test_too_short_clip_is_rejected() -> None:
    with pytest.raises(AudioError, match=r"audio 1: 20.0 ms is too short"):
        EXTRACTOR([np.zeros(1000, np.float32), np.zeros(320, np.float32)])


def test_config_reads_preprocessor_json() -> None:
    config = FeatureConfig.from_dict(
        {"feature_size": 128, "n_samples": 480000, "processor_class": "Qwen2AudioProcessor"}
    )
    assert (config.n_samples, config.nb_max_frames) == (480000, 3000)
    with pytest.raises(ValueError, match="dither"):
        FeatureConfig.from_dict({"dither": 0.1})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_cpu() -> None:
    clips = [load_audio(DATA / "speech_en_16k.wav"), load_audio(DATA / "chirp_40s_22k.wav")]
    cpu = EXTRACTOR(clips)
    cuda = EXTRACTOR(clips, device="cuda")
    assert (cuda.input_features.cpu() - cpu.input_features).abs().max().item() <= 1e-4
    assert torch.equal(cuda.feature_attention_mask.cpu(), cpu.feature_attention_mask)
