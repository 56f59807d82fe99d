"""Featurization throughput (30 s clips per second) against WhisperFeatureExtractor, side by side.

    python bench/features.py [--repeats 15] [--device cpu]

Both extractors see the same random 30 s clips; runs alternate so machine noise hits both alike,
and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from qwen2audio.audio.features import FeatureExtractor


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    oracle = WhisperFeatureExtractor(feature_size=128)
    ours = FeatureExtractor()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'batch':>5} {'transformers clips/s':>21} {'qwen2audio clips/s':>19} {'ratio':>6}")
    for batch in (1, 32):
        clips = [(rng.standard_normal(480_000) * 0.1).astype(np.float32) for _ in range(batch)]

        def run_oracle(clips=clips):
            oracle(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                   return_tensors="pt", device=args.device)

        def run_ours(clips=clips):
            features = ours(clips, device=args.device)
            if features.input_features.is_cuda:
                torch.cuda.synchronize()

        run_oracle()
        run_ours()
        oracle_times, our_times = [], []
        for _ in range(args.repeats):
            oracle_times.append(timed(run_oracle))
            our_times.append(timed(run_ours))
        theirs = batch / statistics.median(oracle_times)
        mine = batch / statistics.median(our_times)
        print(f"{batch:>5} {theirs:>21.1f} {mine:>19.1f} {mine / theirs:>5.1f}x")


if __name__ == "__main__":
    main()
