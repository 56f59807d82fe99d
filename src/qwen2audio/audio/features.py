"""Whisper log-mel features (SPEC.md section 5) in torch, per 30 s window, batched, CPU or CUDA.

Owns the mel filter bank, frame masks and the audio-token count formula, for windows planned by
audio/segment.py. It must not decode audio (audio/io.py does) or know about prompts and tokens
beyond the count.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from qwen2audio.audio.segment import Window, plan_windows
from qwen2audio.config import SAMPLE_RATE
from qwen2audio.errors import AudioError


@dataclass(frozen=True)
class FeatureConfig:
    """The feature extractor's settings, as ``preprocessor_config.json`` stores them."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    padding_value: float = 0.0
    dither: float = 0.0

    @property
    def n_samples(self) -> int:
        """Samples in one window (480,000 for 30 s at 16 kHz)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Frames in one window (3,000)."""
        return self.n_samples // self.hop_length

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureConfig:
        """Read the known keys of a ``preprocessor_config.json``; the rest (processor class...) is ignored."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        if config.dither:
            raise ValueError("preprocessor_config.json sets dither != 0, which makes features random; not supported")
        if "n_samples" in data and int(data["n_samples"]) != config.n_samples:
            raise ValueError(f"preprocessor_config.json: n_samples {data['n_samples']} != chunk_length * sampling_rate")
        return config


def frame_count(num_samples: int, config: FeatureConfig = FeatureConfig()) -> int:
    """Valid mel frames of one window: ``ceil(samples / hop)``, at most one window's frames."""
    return min(-(-num_samples // config.hop_length), config.nb_max_frames)


def audio_token_count(num_frames: int) -> int:
    """Audio tokens the encoder yields for ``num_frames`` valid frames (conv stride 2, then pool 2)."""
    if num_frames <= 0:
        return 0
    after_conv = (num_frames - 1) // 2 + 1
    return max((after_conv - 2) // 2 + 1, 0)


@dataclass
class AudioFeatures:
    """Encoder inputs for a list of clips; every clip owns one or more consecutive windows.

    ``input_features`` [W, n_mels, frames] and ``feature_attention_mask`` [W, frames] use the
    reference's names; ``window_counts[i]`` windows belong to clip i, ``window_tokens[w]`` is the
    number of audio tokens window w yields.
    """

    input_features: torch.Tensor
    feature_attention_mask: torch.Tensor
    window_counts: list[int]
    window_tokens: list[int]

    @property
    def token_counts(self) -> list[int]:
        """Audio tokens per clip: the sum over its windows."""
        counts, start = [], 0
        for n in self.window_counts:
            counts.append(sum(self.window_tokens[start:start + n]))
            start += n
        return counts


class FeatureExtractor:
    """Computes log-mel windows exactly as ``WhisperFeatureExtractor`` (padding="max_length") does.

    Frames that lie wholly in the zero padding have zero power, so their log-mel value is a known
    constant: only the frames that touch audio go through the FFT, which makes short clips cheap.
    """

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        self.config = config
        self._mel = torch.from_numpy(mel_filter_bank(config)).to(torch.float32)  # [n_freq, n_mels]
        self._window = torch.hann_window(config.n_fft)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def token_count(self, samples: np.ndarray, windows: Sequence[Window] | None = None) -> int:
        """Audio tokens a clip yields over its windows (fixed 30 s ones unless given)."""
        planned = windows if windows is not None else self.plan(samples)
        return sum(audio_token_count(frame_count(w.end - w.start, self.config)) for w in planned)

    def plan(self, samples: np.ndarray) -> list[Window]:
        """Plain 30 s windows covering the clip (see :func:`~qwen2audio.audio.segment.plan_windows`)."""
        return plan_windows(samples, "fixed", self.config.chunk_length, skip_silence=False)

    def __call__(self, audios: Sequence[np.ndarray], device: str | torch.device | None = None,
                 windows: Sequence[Sequence[Window]] | None = None) -> AudioFeatures:
        """Cut each clip into its windows (``windows[i]`` for clip i, else fixed 30 s ones) and
        featurize them all in one batch."""
        pieces: list[np.ndarray] = []
        counts: list[int] = []
        for index, samples in enumerate(audios):
            if len(samples) == 0 or audio_token_count(frame_count(len(samples), self.config)) == 0:
                raise AudioError(
                    f"audio {index}: {1000 * len(samples) / self.config.sampling_rate:.1f} ms is too short "
                    f"to yield an audio token (more than 20 ms needed)"
                )
            samples = np.asarray(samples, dtype=np.float32)
            planned = windows[index] if windows is not None else self.plan(samples)
            pieces.extend(samples[w.start:w.end] for w in planned)
            counts.append(len(planned))
        return self.featurize_windows(pieces, counts, device)

    def featurize_windows(
        self, windows: Sequence[np.ndarray], counts: list[int], device: str | torch.device | None = None
    ) -> AudioFeatures:
        """Featurize windows of at most one window's samples each."""
        cfg = self.config
        lengths = [len(w) for w in windows]
        if not windows:
            empty = torch.zeros(0, cfg.feature_size, cfg.nb_max_frames)
            return AudioFeatures(empty, torch.zeros(0, cfg.nb_max_frames, dtype=torch.long), counts, [])
        device = torch.device(device) if device is not None else torch.device("cpu")
        # samples that crossed a process (Ray) arrive read-only; torch wants arrays it may write
        features = self.log_mel([torch.as_tensor(w if w.flags.writeable else w.copy()) for w in windows], device)
        valid = [frame_count(n, cfg) for n in lengths]
        frames = torch.tensor(valid, device=device)
        mask = (torch.arange(cfg.nb_max_frames, device=device)[None, :] < frames[:, None]).long()  # [W, frames]
        tokens = [audio_token_count(n) for n in valid]
        return AudioFeatures(features, mask, counts, tokens)

    def log_mel(self, windows: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Log-mel of windows of at most one window's samples each -> [W, n_mels, nb_max_frames]."""
        cfg = self.config
        out = torch.empty(len(windows), cfg.feature_size, cfg.nb_max_frames, device=device)
        # A few windows at a time keep the FFT's intermediates in cache; on a GPU one batch is best.
        step = len(windows) if device.type == "cuda" else 4
        for start in range(0, len(windows), step):
            self._log_mel_chunk(windows[start:start + step], out[start:start + step])
        return out

    def _log_mel_chunk(self, windows: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Fill out [w, n_mels, n_frames] for a few windows."""
        cfg = self.config
        device = out.device
        mel, window = self._on(device)
        half, hop, n_frames = cfg.n_fft // 2, cfg.hop_length, cfg.nb_max_frames
        # Frame t spans samples [t*hop - half, t*hop + half): past the audio it is all zeros.
        longest = min(max(len(w) for w in windows), cfg.n_samples)
        live = min(n_frames, -(-(longest + half) // hop))
        extent = (live - 1) * hop + cfg.n_fft
        # The zero-padded window, centred as torch.stft does: `half` reflected samples on each side.
        padded = torch.zeros(len(windows), extent, device=device)  # [w, extent]
        for row, samples in enumerate(windows):
            usable = min(len(samples), cfg.n_samples, extent - half)
            padded[row, half:half + usable] = samples[:usable].to(device, non_blocking=True)
        padded[:, :half] = padded[:, half + 1:2 * half + 1].flip(-1)
        end = half + cfg.n_samples
        if extent > end:  # the last frames reach past the window: reflect its (zero-padded) end
            padded[:, end:] = padded[:, 2 * end - extent - 1:end - 1].flip(-1)
        frames = padded.unfold(-1, cfg.n_fft, hop)[:, :live] * window  # [w, live, n_fft]
        spectrum = torch.view_as_real(torch.fft.rfft(frames, dim=-1))  # [w, live, n_freq, 2]
        power = torch.addcmul(spectrum[..., 0].square(), spectrum[..., 1], spectrum[..., 1])  # [w, live, n_freq]
        log_spec = self._apply_mel(power, mel).clamp_(min=1e-10).log10_()  # [w, n_mels, live]
        peak = log_spec.amax(dim=(1, 2))  # [w]
        if live < n_frames:
            silent = torch.tensor(1e-10, device=device).log10()
            peak = torch.maximum(peak, silent)
            out[:, :, live:] = torch.maximum(silent, peak - 8.0)[:, None, None]
        torch.maximum(log_spec, (peak - 8.0)[:, None, None], out=out[:, :, :live])
        out.add_(4.0).div_(4.0)

    @staticmethod
    def _apply_mel(power: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """[w, frames, n_freq] -> [w, n_mels, frames]. On CPU the filter bank is sparse CSR
        (about 400 of its 25,728 entries are non-zero), several times faster than a dense product."""
        if mel.layout == torch.sparse_csr:
            return torch.stack([mel @ frame_power.T.contiguous() for frame_power in power])
        return (power @ mel).transpose(1, 2)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            mel = self._mel.to(device)
            if device.type == "cpu":
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore")
                    mel = mel.T.contiguous().to_sparse_csr()  # [n_mels, n_freq]
            self._device_cache[device] = (mel, self._window.to(device))
        return self._device_cache[device]


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = freq / (200.0 / 3)
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) / (np.log(6.4) / 27.0)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = mels * (200.0 / 3)
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def mel_filter_bank(config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Triangular Slaney-normalised filters over 0 Hz-8 kHz: [n_fft // 2 + 1, n_mels], float64."""
    fft_freqs = np.linspace(0.0, config.sampling_rate / 2, config.n_fft // 2 + 1)
    mel_edges = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], config.feature_size + 2)
    edges = _mel_to_hz(mel_edges)  # [n_mels + 2]
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [n_freq, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None, :]


__all__ = [
    "AudioFeatures",
    "FeatureConfig",
    "FeatureExtractor",
    "audio_token_count",
    "frame_count",
    "mel_filter_bank",
]
