"""Processor wall time (conversation + 30 s audio -> model inputs) against transformers, side by side.

    python bench/processor.py [--repeats 9] [--tokenizer tests/data/qwen2-tokenizer]

Both processors get the same conversations with the same random 30 s clips as arrays. Ours renders,
tokenizes, expands and featurizes them; transformers' Qwen2AudioProcessor does the same through
apply_chat_template and __call__ (left padding). Runs alternate so machine noise hits both alike;
the median of the repeats is reported, and the outputs are checked to agree once.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

from qwen2audio.processor import Processor

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What does the speaker say?",
    "Describe the sound in one sentence.",
    "Transcribe the audio, then translate it into French.",
    "请把这段话翻译成英文。",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests" / "data" / "qwen2-tokenizer"))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.padding_side = "left"
    theirs = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    ours = Processor.from_pretrained(args.tokenizer)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}, CPU")
    print(f"{'batch':>5} {'transformers s':>15} {'qwen2audio s':>13} {'speed-up':>9}   (min-max: transformers | ours)")
    for batch in (1, 32):
        clips = [np.clip(rng.standard_normal(480_000) * 0.1, -1, 1).astype(np.float32) for _ in range(batch)]
        questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(batch)]
        conversations = [
            [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": question}]}]
            for clip, question in zip(clips, questions, strict=True)
        ]
        oracle_conversations = [
            [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"}, {"type": "text", "text": q}]}]
            for q in questions
        ]

        def run_theirs(conversations=oracle_conversations, clips=clips):
            texts = [theirs.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
            return theirs(text=texts, audio=clips, return_tensors="pt", padding=True, sampling_rate=16000)

        def run_ours(conversations=conversations):
            return ours(conversations)

        expected, got = run_theirs(), run_ours()  # also the warm-up
        assert torch.equal(got.input_ids, expected["input_ids"])
        assert (got.input_features - expected["input_features"]).abs().max().item() <= 1e-4
        their_times, our_times = [], []
        for _ in range(args.repeats):
            their_times.append(timed(run_theirs))
            our_times.append(timed(run_ours))
        t_theirs, t_ours = statistics.median(their_times), statistics.median(our_times)
        spread = f"{min(their_times):.3f}-{max(their_times):.3f} | {min(our_times):.3f}-{max(our_times):.3f}"
        print(f"{batch:>5} {t_theirs:>15.3f} {t_ours:>13.3f} {t_theirs / t_ours:>8.1f}x   ({spread})")


if __name__ == "__main__":
    main()
