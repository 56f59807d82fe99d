"""Real speech with known timing for the long-audio tests: Debian's espeak-ng speaks sentences one
by one, joined with pauses of known length, so every sentence's interval is known to the sample."""

from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np

from qwen2audio.audio.io import load_audio
from qwen2audio.config import SAMPLE_RATE

HAVE_ESPEAK = shutil.which("espeak-ng") is not None

SUBJECTS = ["The old lighthouse keeper", "A curious student", "Our neighbour from the coast", "The tired engineer",
            "A small orange cat", "The conductor of the night train", "My grandmother", "The new museum guide"]
ACTIONS = ["wrote a long letter about the storm that flooded the harbour last winter",
           "counted the boats returning slowly to the quiet bay before sunset",
           "explained why the bridge was closed for repairs during the festival",
           "remembered the name of every street in the village where she grew up",
           "carried three heavy boxes of books up the narrow wooden stairs",
           "listened to the rain on the roof while the radio played softly"]


def sentences(count: int) -> list[str]:
    return [f"{SUBJECTS[k % len(SUBJECTS)]} {ACTIONS[(k * 5) % len(ACTIONS)]}." for k in range(count)]


@functools.cache
def spoken(text: str) -> np.ndarray:
    """The sentence at 16 kHz, trimmed to where its samples rise above -40 dBFS (so its interval is exact)."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "165", text], capture_output=True, check=True).stdout
    samples = load_audio(wav)
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0]:loud[-1] + 1]


def speech(count: int, silence_at: int | None = None, silence_s: float = 60.0) -> tuple[np.ndarray, list[tuple]]:
    """Sentences joined by pauses of 0.45-1.2 s (seeded), optionally a long silence after sentence
    ``silence_at``: (samples, [(start, end) of each sentence, in samples])."""
    rng = np.random.default_rng(5)
    parts, intervals, position = [], [], 0
    for k, text in enumerate(sentences(count)):
        pause = silence_s if k == silence_at else rng.uniform(0.45, 1.2)
        gap = np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)
        clip = spoken(text)
        parts += [gap, clip]
        intervals.append((position + len(gap), position + len(gap) + len(clip)))
        position += len(gap) + len(clip)
    parts.append(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))
    return np.concatenate(parts), intervals
