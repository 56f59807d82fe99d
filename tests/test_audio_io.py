"""load_audio: every shipped format, every source kind, every bad input."""

from __future__ import annotations

import base64
import io
import pathlib

import numpy as np
import pytest
import soundfile
import torch

from qwen2audio import AudioError, load_audio
from qwen2audio.audio.io import UrlPolicy

from serving import serve_bytes

DATA = pathlib.Path(__file__).parent / "data"
SPEECH_SECONDS = 6.401  # speech_en_16k.wav: 102,414 samples at 16 kHz

FORMATS = {
    "speech_en_16k.wav": SPEECH_SECONDS,
    "speech_en_44k_stereo.wav": SPEECH_SECONDS,
    "speech_en_48k.flac": SPEECH_SECONDS,
    "speech_en.mp3": SPEECH_SECONDS,
    "speech_en.ogg": SPEECH_SECONDS,
    "speech_en.webm": SPEECH_SECONDS,
    "speech_en.m4a": SPEECH_SECONDS,
    "tone_440hz_3s.wav": 3.0,
    "silence_2s.wav": 2.0,
    "chirp_40s_22k.wav": 40.0,
    "question_en_16k.wav": 2.313,
}


@pytest.mark.parametrize("name,seconds", FORMATS.items())
def test_every_format_decodes_to_16k_mono_float32(name: str, seconds: float) -> None:
    samples = load_audio(DATA / name)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / 16000 - seconds) <= 0.060
    assert np.abs(samples).max() <= 1.0


ALIGNED = {  # decoded vs the 16 kHz PCM original, after aligning by cross-correlation: (lag, correlation)
    "speech_en_48k.flac": 0.9999, "speech_en_44k_stereo.wav": 0.9999,  # lossless, resampled
    "speech_en.mp3": 0.99, "speech_en.ogg": 0.97, "speech_en.webm": 0.98, "speech_en.m4a": 0.99,  # lossy
}


@pytest.mark.parametrize("name", ALIGNED)
def test_each_format_decodes_to_the_samples_of_the_16k_original(name: str) -> None:
    """Every encoding of the same speech decodes to the original's samples: in time (codec delays
    and padding trimmed, within a couple of samples) and in shape (correlation; lossless formats
    within resampling error)."""
    reference = load_audio(DATA / "speech_en_16k.wav")
    decoded = load_audio(DATA / name)
    size = 1 << (len(reference) + len(decoded)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lag = int(np.argmax(xcorr))
    lag = lag if lag < size // 2 else lag - size
    assert abs(lag) <= 2, f"{name} is shifted by {lag} samples"
    a, b = (decoded[lag:], reference) if lag >= 0 else (decoded, reference[-lag:])
    n = min(len(a), len(b))
    assert abs(len(decoded) - len(reference)) <= 0.010 * 16000  # at most 10 ms of codec padding
    assert np.corrcoef(a[:n], b[:n])[0, 1] > ALIGNED[name]
    if ALIGNED[name] > 0.999:  # lossless: the samples themselves, up to resampling error
        np.testing.assert_allclose(a[:n], b[:n], atol=2e-3)


def test_lossy_decodes_resemble_the_pcm_original() -> None:
    reference = load_audio(DATA / "speech_en_16k.wav")
    for name in ["speech_en_48k.flac", "speech_en_44k_stereo.wav", "speech_en.ogg"]:
        decoded = load_audio(DATA / name)
        n = min(len(reference), len(decoded))
        corr = np.corrcoef(reference[:n], decoded[:n])[0, 1]
        assert corr > 0.9, (name, corr)  # Opus is lossy: 0.94 measured


def test_stereo_is_the_channel_mean() -> None:
    stereo, rate = soundfile.read(DATA / "speech_en_44k_stereo.wav", dtype="float32")
    assert stereo.shape[1] == 2 and rate == 44100
    expected = load_audio((stereo.mean(axis=1), rate))
    np.testing.assert_allclose(load_audio(DATA / "speech_en_44k_stereo.wav"), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["speech_en_48k.flac", "speech_en.m4a", "speech_en.webm", "speech_en.mp3"])
def test_path_bytes_base64_data_uri_and_file_object_agree(name: str) -> None:
    path = DATA / name
    raw = path.read_bytes()
    b64 = base64.b64encode(raw).decode()
    reference = load_audio(path)
    for source in [str(path), raw, bytearray(raw), b64, f"data:audio/whatever;base64,{b64}", io.BytesIO(raw),
                   path.as_uri()]:
        np.testing.assert_array_equal(load_audio(source), reference)


def test_arrays_and_tensors() -> None:
    rng = np.random.default_rng(0)
    mono = rng.uniform(-0.5, 0.5, 16000).astype(np.float32)
    np.testing.assert_array_equal(load_audio(mono), mono)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(mono)), mono)
    np.testing.assert_allclose(load_audio(mono.astype(np.float64)), mono)
    # int16 PCM scales by 1 / 32768 (hand calculation: 16384 -> 0.5, -32768 -> -1.0)
    np.testing.assert_array_equal(load_audio(np.array([16384, -32768] * 200, dtype=np.int16))[:2], [0.5, -1.0])
    # channels-first and channels-last stereo both average the two channels
    left, right = mono, -mono * 0.5
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(np.stack([left, right])), expected, atol=1e-7)
    np.testing.assert_allclose(load_audio(np.stack([left, right], axis=1)), expected, atol=1e-7)


def test_tuple_is_resampled() -> None:
    tone_8k = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32) * 0.5
    out = load_audio((tone_8k, 8000))
    assert len(out) == 16000
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 0.5
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 1e-3
    assert len(load_audio((tone_8k, 8000), sampling_rate=8000)) == 8000


def test_truncated_mp3_decodes_what_it_can() -> None:
    samples = load_audio(DATA / "truncated.mp3")
    assert 0.1 < len(samples) / 16000 < 1.0
    full = load_audio(DATA / "speech_en.mp3")
    n = len(samples) - 1000
    assert np.corrcoef(full[:n], samples[:n])[0, 1] > 0.99


@pytest.mark.parametrize(
    "source,message",
    [
        (DATA / "empty.wav", "empty.wav': empty (0 bytes)"),
        (DATA / "random_bytes.wav", "random_bytes.wav': cannot decode audio, unsupported or corrupt format"),
        (DATA / "too_short_10ms.wav", "10.0 ms of audio is too short to yield an audio token"),
        (DATA / "missing.wav", "missing.wav': no such file"),
        (DATA, "is a directory"),
        (b"", "audio bytes (0 bytes): empty"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt garbage", "cannot decode audio"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain', not audio"),
        ("data:audio/wav;base64,@@@not base64@@@", "payload is not valid base64"),
        ("ftp://example.com/a.wav", "unsupported URL scheme 'ftp'"),
        ("https://example.com/a.wav", "fetching audio from URLs is not allowed"),
        (np.array([0.1, np.nan] * 1000, dtype=np.float32), "NaN or infinite samples"),
        (np.array([0.1, np.inf] * 1000, dtype=np.float32), "NaN or infinite samples"),
        (np.zeros(320, dtype=np.float32), "20.0 ms of audio is too short"),
        (np.zeros((2, 3, 400), dtype=np.float32), "expected a 1-D (mono) or 2-D (stereo) array"),
        (np.array(["a", "b"]), "is not PCM"),
        ((np.zeros(1000), -5), "positive rate"),
        (12345, "unsupported audio source type int"),
    ],
)
def test_bad_input_names_the_source_and_reason(source, message: str) -> None:
    with pytest.raises(AudioError) as info:
        load_audio(source)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_maximum_duration_is_configurable() -> None:
    with pytest.raises(AudioError, match=r"40.0 s of audio is longer than the 30 s maximum"):
        load_audio(DATA / "chirp_40s_22k.wav", max_duration_s=30)
    assert len(load_audio(DATA / "chirp_40s_22k.wav")) == 640000
    with pytest.raises(AudioError, match="longer than the 1200 s maximum"):
        load_audio(np.zeros(16000 * 1201, dtype=np.float32))


def test_url_policy_refuses_disallowed_hosts() -> None:
    policy = UrlPolicy(allow_host=lambda host: host == "allowed.example")
    with pytest.raises(AudioError, match="host 'localhost' is not allowed"):
        load_audio("http://localhost:1/a.wav", url_policy=policy)


def test_url_download_respects_size_limit_and_decodes(tmp_path) -> None:
    payload = (DATA / "speech_en_48k.flac").read_bytes()
    with serve_bytes(payload) as (base, _):
        url = f"{base}/speech.flac"
        np.testing.assert_array_equal(load_audio(url, url_policy=UrlPolicy()), load_audio(payload))
        with pytest.raises(AudioError, match="larger than the 1000 byte limit"):
            load_audio(url, url_policy=UrlPolicy(max_bytes=1000))


def test_the_mp3_decoders_own_warnings_go_to_logging_not_stderr(capfd, caplog):
    """libsndfile's MP3 decoder prints "Xing stream size off ..." on file descriptor 2 for this
    truncated file; it reaches logging (INFO) instead, and nothing reaches the terminal."""
    import logging

    from qwen2audio import load_audio

    with caplog.at_level(logging.INFO, logger="qwen2audio"):
        samples = load_audio(pathlib.Path(__file__).parent / "data" / "truncated.mp3")
    assert len(samples) > 0
    assert capfd.readouterr().err == ""
    assert any("Xing stream size off" in record.getMessage() for record in caplog.records)
