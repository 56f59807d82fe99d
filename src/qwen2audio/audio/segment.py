"""Where long audio is cut into the model's windows: in pauses, found by voice activity detection.

Cutting every 30 s wherever that lands splits words, garbling both sides of the cut. Here a window
is at most 30 s and ends where speech pauses (Silero VAD, whose model ships inside the
``silero-vad`` package, so it works offline); speech that runs on past a window is cut at its
quietest moment; stretches with no speech get no window at all, so they cost no model call.
``fixed`` keeps the plain 30 s cuts.

Chat and evaluation keep every sample (``skip_silence=False``): Qwen2-Audio is asked about sounds
and music too, which a VAD calls silence, so there the windows tile the whole clip and only the
cut points move into pauses. A clip of one window or less is left whole, as the reference sees it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from qwen2audio.config import SAMPLE_RATE
from qwen2audio.errors import InputError

logger = logging.getLogger(__name__)

Segmentation = Literal["vad", "fixed"]
SEGMENTATIONS: tuple[str, ...] = get_args(Segmentation)
WINDOW_S = 30.0  # the encoder's window (FeatureConfig.chunk_length)
MIN_WINDOW_S = 0.02  # a window must yield one audio token (more than 20 ms)
QUIET_FRAME = int(0.02 * SAMPLE_RATE)  # the frame over which "quietest moment" is measured
_VAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Window:
    """Samples [start, end) of the clip, fed to the model as one window."""

    start: int
    end: int

    @property
    def seconds(self) -> tuple[float, float]:
        return self.start / SAMPLE_RATE, self.end / SAMPLE_RATE


def plan_windows(samples: np.ndarray, segmentation: Segmentation = "vad", window_s: float = WINDOW_S, *,
                 skip_silence: bool = True) -> list[Window]:
    """The windows a long clip is cut into (16 kHz mono samples), in order. With ``skip_silence``
    (transcription) windows cover speech only; without it (chat) they tile the whole clip."""
    check_segmentation(segmentation)
    size = int(window_s * SAMPLE_RATE)
    if segmentation == "fixed":
        windows = [Window(start, min(start + size, len(samples))) for start in range(0, len(samples), size)]
    elif not skip_silence:
        windows = _tile(samples, speech_spans(samples) if len(samples) > size else [], size)
    else:
        windows = [piece for start, end in _merge(speech_spans(samples), size)
                   for piece in _split(samples, start, end, size)]
    return [w for w in windows if w.end - w.start > MIN_WINDOW_S * SAMPLE_RATE]


def check_segmentation(segmentation: str) -> None:
    """InputError (a ValueError) unless ``segmentation`` is one of SEGMENTATIONS."""
    if segmentation not in SEGMENTATIONS:
        raise InputError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, not {segmentation!r}")


def speech_spans(samples: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each stretch of speech, padded a little either side (Silero's defaults)."""
    if len(samples) == 0:
        return []
    import torch

    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with _VAD_LOCK:  # the model carries state from chunk to chunk: one clip at a time
        stamps = _silero().get_speech_timestamps(audio, _vad_model(), sampling_rate=SAMPLE_RATE)
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def no_speech_probability(samples: np.ndarray) -> float:
    """1 - the VAD's highest speech probability over the clip's 32 ms frames (Whisper's
    no_speech_prob, estimated by the VAD rather than by a decoder token)."""
    if len(samples) == 0:
        return 1.0
    import torch

    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with _VAD_LOCK, torch.inference_mode():
        probabilities = _vad_model().audio_forward(audio, sr=SAMPLE_RATE)
        _vad_model().reset_states()
    return float(1.0 - probabilities.max())


def _merge(spans: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Consecutive speech spans joined into windows of at most ``size`` samples (a lone longer span
    is left to _split). When more speech follows, a window ends before the longest pause in its
    second half: a pause between sentences rather than a breath between words."""
    windows, i = [], 0
    while i < len(spans):
        start, last = spans[i][0], i
        while last + 1 < len(spans) and spans[last + 1][1] - start <= size:
            last += 1
        if last + 1 < len(spans):
            back_half = [k for k in range(i, last + 1) if spans[k][1] - start >= size // 2] or [last]
            last = max(back_half, key=lambda k: spans[k + 1][0] - spans[k][1])
        windows.append((start, spans[last][1]))
        i = last + 1
    return windows


def _split(samples: np.ndarray, start: int, end: int, size: int) -> list[Window]:
    """Speech longer than a window cut at its quietest 20 ms in the second half of each window."""
    pieces = []
    while end - start > size:
        cut = _quietest(samples, start + size // 2, start + size)
        pieces.append(Window(start, cut))
        start = cut
    pieces.append(Window(start, end))
    return pieces


def _tile(samples: np.ndarray, spans: Sequence[tuple[int, int]], size: int) -> list[Window]:
    """Windows covering the whole clip, each cut in the second half of its span at the quietest
    20 ms of the longest pause in speech there (of the whole half where there is no speech, as in
    music, or no pause)."""
    windows, start = [], 0
    while len(samples) - start > size:
        low, high = start + size // 2, start + size
        pauses = [gap for gap in _pauses(spans, low, high) if gap[1] - gap[0] >= QUIET_FRAME]
        cut = _quietest(samples, *max(pauses, key=lambda gap: gap[1] - gap[0], default=(low, high)))
        windows.append(Window(start, cut))
        start = cut
    windows.append(Window(start, len(samples)))
    return windows


def _pauses(spans: Sequence[tuple[int, int]], low: int, high: int) -> list[tuple[int, int]]:
    """The stretches of [low, high) outside every speech span."""
    pauses, edge = [], low
    for start, end in spans:
        if end <= edge:
            continue
        if start >= high:
            break
        if start > edge:
            pauses.append((edge, start))
        edge = end
    if edge < high:
        pauses.append((edge, high))
    return pauses


def _quietest(samples: np.ndarray, low: int, high: int) -> int:
    frame = QUIET_FRAME
    region = samples[low:high]
    frames = region[: len(region) // frame * frame].reshape(-1, frame).astype(np.float64)
    energy = (frames**2).mean(axis=1)
    latest = len(energy) - 1 - int(np.argmin(energy[::-1]))  # of equals the latest: longer windows, fewer of them
    return low + latest * frame + frame // 2


@functools.cache
def _silero() -> Any:
    """The silero_vad module, imported on first use: importing it sets torch's thread count to 1
    for the whole process (a 2-core machine ran everything at half speed), which is undone here."""
    import torch

    threads = torch.get_num_threads()
    import silero_vad

    torch.set_num_threads(threads)
    return silero_vad


@functools.cache
def _vad_model() -> Any:
    logger.debug("loading the Silero VAD model")
    return _silero().load_silero_vad()
