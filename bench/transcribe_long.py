"""A 10-minute file through transcription: its windows all at once vs one at a time, in one run.

    python bench/transcribe_long.py [--minutes 10] [--tokens 128]

Real speech with known pauses (Debian's espeak-ng, as the tests make it), cut in pauses by the
VAD; the mid-size random checkpoint of bench/engine_cpu.py. Times the generation of every window
concurrently (what `qwen2audio transcribe` does) against the same windows' prompts run one after
another, greedy, the same tokens each way; prints the ratio (the issue's target: at most 0.6), and
the whole `transcribe` call (decoding, VAD, planning included) for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

import soundfile
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from engine_cpu import AUDIO, TEXT
from qwen2audio.api import Qwen2Audio
from qwen2audio.engine.async_engine import AsyncEngine
from qwen2audio.engine.options import EngineOptions
from qwen2audio.transcribe import Transcriber

from checkpoints import build_checkpoint
from speech import HAVE_ESPEAK, speech


async def one_at_a_time(transcriber: Transcriber, transcript, prompts, generate) -> list[list[int]]:
    tokens = []
    for segment, prompt in zip(transcript.segments, prompts, strict=True):
        await transcriber.run(type(transcript)(transcript.path, [segment]), [prompt], generate)
        tokens.append(list(segment.tokens))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=128,
                        help="most tokens per window (30 s of speech at 150 words a minute is about 100 tokens)")
    args = parser.parse_args()
    if not HAVE_ESPEAK:
        sys.exit("needs Debian's espeak-ng (apt-get install espeak-ng)")
    samples, _ = speech(int(args.minutes * 60 / 5.4) + 1)  # about 5.4 s a sentence with its pause
    path = pathlib.Path(tempfile.mkdtemp()) / "talk.wav"
    soundfile.write(path, samples, 16000)
    directory = build_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "mid", text_dims=TEXT, audio_dims=AUDIO,
                                 randomize=False)
    # No encoder cache: each way encodes every window (a cache filled by the first would favour the second).
    model = Qwen2Audio.from_pretrained(directory, device="cpu", dtype="float32", progress=False,
                                       engine_options=EngineOptions(encoder_cache_bytes=0))
    transcriber = Transcriber(model, max_new_tokens=args.tokens)
    transcript, prompts = transcriber.plan(samples, str(path))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(samples) / 16000 / 60:.1f} min of "
          f"speech, {len(prompts)} windows, at most {args.tokens} tokens each")
    engine = AsyncEngine(model.engine)
    try:
        asyncio.run(transcriber.run(*transcriber.plan(samples[: 16000 * 20], "warm-up"), engine.generate))
        started = time.perf_counter()
        asyncio.run(transcriber.run(transcript, prompts, engine.generate))
        together = time.perf_counter() - started
        started = time.perf_counter()
        alone = asyncio.run(one_at_a_time(transcriber, transcript, prompts, engine.generate))
        sequential = time.perf_counter() - started
    finally:
        engine.shutdown()
    assert alone == [s.tokens for s in transcript.segments], "the two ways must generate the same tokens"
    started = time.perf_counter()
    transcriber.transcribe([path], progress=False)
    whole = time.perf_counter() - started
    print(f"windows together {together:.1f} s, one at a time {sequential:.1f} s: ratio {together / sequential:.2f} "
          f"(target <= 0.6); `transcribe` end to end {whole:.1f} s")


if __name__ == "__main__":
    main()
