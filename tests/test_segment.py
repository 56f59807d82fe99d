"""Where long audio is cut, on real speech with known timing: Debian's espeak-ng speaks sentences one
by one, joined with pauses of known length, so every sentence's interval is known to the sample.
Fixed 30 s cuts land inside sentences; the VAD windows never do, stay within 30 s, cover every
sentence, and give a long silence no window (no model call)."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest

from qwen2audio.audio.segment import WINDOW_S, Window, plan_windows
from qwen2audio.config import SAMPLE_RATE

from speech import HAVE_ESPEAK, sentences, speech, spoken

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="needs Debian's espeak-ng (see .ci/run)")

def cuts_inside(windows: list[Window], intervals: list[tuple]) -> list[int]:
    """Window edges that fall strictly inside a sentence."""
    edges = {edge for w in windows for edge in (w.start, w.end)}
    return sorted(e for e in edges for start, end in intervals if start < e < end)


@pytest.fixture(scope="module")
def five_minutes():
    samples, intervals = speech(95)
    assert len(samples) / SAMPLE_RATE >= 300
    return samples, intervals


def test_fixed_cuts_fall_inside_sentences_and_vad_cuts_never_do(five_minutes):
    samples, intervals = five_minutes
    fixed = plan_windows(samples, "fixed")
    assert [w.start for w in fixed] == list(range(0, len(samples), int(WINDOW_S * SAMPLE_RATE)))
    assert cuts_inside(fixed, intervals), "the fixture should make fixed cuts land inside sentences"
    windows = plan_windows(samples, "vad")
    assert not cuts_inside(windows, intervals)
    assert all(0 < w.end - w.start <= WINDOW_S * SAMPLE_RATE for w in windows)
    assert all(a.end <= b.start for a, b in itertools.pairwise(windows))
    assert all(any(w.start <= start and end <= w.end for w in windows) for start, end in intervals)


def test_a_long_silence_gets_no_window(five_minutes):
    samples, intervals = speech(24, silence_at=12)
    silence = (intervals[11][1], intervals[12][0])
    assert (silence[1] - silence[0]) / SAMPLE_RATE >= 60
    windows = plan_windows(samples, "vad")
    margin = SAMPLE_RATE  # Silero pads speech by a fraction of a second
    assert not [w for w in windows if w.end > silence[0] + margin and w.start < silence[1] - margin]
    assert not cuts_inside(windows, intervals)
    assert plan_windows(np.zeros(90 * SAMPLE_RATE, dtype=np.float32), "vad") == []


def test_chat_windows_tile_the_whole_clip_and_cut_only_in_pauses(five_minutes):
    """Chat keeps every sample (the model is asked about sounds as well as speech): the windows
    cover the clip end to end, each at most 30 s, and no cut falls inside a sentence."""
    samples, intervals = five_minutes
    windows = plan_windows(samples, "vad", skip_silence=False)
    assert windows[0].start == 0 and windows[-1].end == len(samples)
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    assert all(w.end - w.start <= WINDOW_S * SAMPLE_RATE for w in windows)
    assert not cuts_inside(windows, intervals)
    assert cuts_inside(plan_windows(samples, "fixed", skip_silence=False), intervals)


def test_chat_windows_of_music_are_cut_at_its_quietest_moments():
    """A 70 s tone (no speech for the VAD) that dips to near silence for 0.2 s at 22 s and at 48 s:
    each cut lands in the dip inside its window's second half (15-30 s, then 37-52 s)."""
    t = np.arange(70 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for dip in (22.0, 48.0):
        tone[int(dip * SAMPLE_RATE):int((dip + 0.2) * SAMPLE_RATE)] *= 0.01
    cuts = [w.end / SAMPLE_RATE for w in plan_windows(tone, "vad", skip_silence=False)[:-1]]
    assert len(cuts) == 2 and 22.0 <= cuts[0] <= 22.2 and 48.0 <= cuts[1] <= 48.2, cuts


def test_a_clip_of_one_window_is_left_whole_without_asking_the_vad(monkeypatch):
    import qwen2audio.audio.segment as segment

    monkeypatch.setattr(segment, "speech_spans", lambda samples: pytest.fail("the VAD ran"))
    clip = np.ones(30 * SAMPLE_RATE, dtype=np.float32)
    assert plan_windows(clip, "vad", skip_silence=False) == [Window(0, len(clip))]


def test_the_processor_encodes_long_audio_in_the_planned_windows(five_minutes):
    """About 100 s of it in a chat message: the prompt carries the VAD windows (no cut in a sentence),
    its audio tokens are theirs, each window is featurized as a clip of its own, and the cache key
    differs from the same audio cut every 30 s."""
    from qwen2audio.processor import Processor

    directory = pathlib.Path(__file__).parent / "data" / "qwen2-tokenizer"
    vad, fixed = Processor.from_pretrained(directory), Processor.from_pretrained(directory, segmentation="fixed")
    samples, intervals = five_minutes
    clip = samples[:next(end for _, end in intervals if end > 100 * SAMPLE_RATE)]
    message = [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]
    prompt = vad.prepare(message)
    (windows,) = prompt.windows
    assert windows == plan_windows(clip, "vad", skip_silence=False) and not cuts_inside(windows, intervals)
    assert prompt.lengths == [sum(vad.feature_extractor.token_count(clip[w.start:w.end]) for w in windows)]
    batch = vad.collate([prompt])
    alone = vad.feature_extractor([clip[w.start:w.end] for w in windows])
    assert batch.window_tokens == alone.window_tokens and batch.audio_spans[0][0].num_windows == len(windows)
    assert np.array_equal(batch.input_features.numpy(), alone.input_features.numpy())
    assert fixed.prepare(message).digests != prompt.digests


def test_speech_without_pauses_is_cut_at_its_quietest_moment():
    """45 s of one sentence after another with no pause at all: the cut lands in the window's second
    half, at one of the quiet gaps between words rather than at 30 s exactly."""
    text = " ".join(sentences(14))
    clip = spoken(text)
    assert len(clip) / SAMPLE_RATE > 40
    windows = plan_windows(clip, "vad")
    size = WINDOW_S * SAMPLE_RATE
    assert len(windows) >= 2 and all(w.end - w.start <= size for w in windows)
    cut = windows[0].end
    assert size / 2 <= cut - windows[0].start <= size
    frame = clip[cut - 160:cut + 160]
    assert np.sqrt(np.mean(frame**2)) < 0.2 * np.sqrt(np.mean(clip**2))


def test_segmentation_is_checked():
    with pytest.raises(ValueError, match="segmentation"):
        plan_windows(np.zeros(16000, dtype=np.float32), "silence")


def test_transcription_plans_one_request_per_speech_window(tiny_checkpoint):
    """The transcriber's segments are the VAD windows' times, and a 60 s silence costs no request,
    where fixed cuts spend one on nothing but silence."""
    from qwen2audio.api import Qwen2Audio
    from qwen2audio.transcribe import Transcriber

    model = Qwen2Audio.from_pretrained(tiny_checkpoint, progress=False)
    samples, intervals = speech(24, silence_at=12)
    silence = (intervals[11][1] / SAMPLE_RATE, intervals[12][0] / SAMPLE_RATE)
    transcript, prompts = Transcriber(model).plan(samples, "talk.wav")
    assert [(s.start, s.end) for s in transcript.segments] == [w.seconds for w in plan_windows(samples, "vad")]
    assert len(prompts) == len(transcript.segments)
    assert not [s for s in transcript.segments if s.end > silence[0] + 1 and s.start < silence[1] - 1]
    fixed, fixed_prompts = Transcriber(model, segmentation="fixed").plan(samples, "talk.wav")
    assert len(fixed_prompts) == len(fixed.segments)
    assert [s for s in fixed.segments if silence[0] <= s.start and s.end <= silence[1]]  # a call on silence


def test_the_vad_leaves_torchs_thread_count_alone():
    """silero_vad sets torch's thread count to 1 when imported: for the whole process, every model
    would run on one core. A fresh interpreter, so the import happens here."""
    import subprocess
    import sys

    code = ("import numpy, torch; torch.set_num_threads(2); import qwen2audio; "
            "from qwen2audio.audio.segment import plan_windows; plan_windows(numpy.zeros(32000, numpy.float32)); "
            "print(torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "2"


def test_no_speech_probability_tells_a_tone_from_a_sentence():
    from qwen2audio.audio.io import load_audio
    from qwen2audio.audio.segment import no_speech_probability

    tone = load_audio(pathlib.Path(__file__).parent / "data" / "tone_440hz_3s.wav")
    assert no_speech_probability(tone) > 0.9 > 0.1 > no_speech_probability(spoken(sentences(1)[0]))
    assert no_speech_probability(np.zeros(0, dtype=np.float32)) == 1.0
