"""LoRA serving cost on the CPU: 8 concurrent requests spread over 4 adapters against the same 8 on
the base model, one engine, side by side in one run.

    python bench/lora_cpu.py [--new-tokens 64] [--repeats 3] [--rank 16]

The mid-size random checkpoint of bench/engine_cpu.py (decoder hidden 896, 8 layers, GQA 14/2;
encoder 384 wide, 4 layers); four rank-16 adapters on every linear layer of the decoder (q, k, v,
o, gate, up, down), written in PEFT's format (tests/checkpoints.py write_lora). Each repeat draws
8 new clips (4-15 s) with a question; both sides answer them greedily, exactly --new-tokens each,
in alternating order. The prefix and encoder caches are off so neither side reuses the other's
work. Prints each side's time and output tokens/s and the slowdown (target: at most 1.3x).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from engine_cpu import AUDIO, TEXT, conversations
from qwen2audio.api import Qwen2Audio
from qwen2audio.engine.options import EngineOptions

from checkpoints import build_checkpoint, write_lora

ADAPTERS = 4
SECONDS = [4, 6, 8, 10, 12, 15, 5, 9]


def timed(model: Qwen2Audio, prompts: list, new_tokens: int) -> float:
    started = time.perf_counter()
    replies = model.generate_prepared(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    assert all(len(reply.token_ids) == new_tokens for reply in replies)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    root = pathlib.Path(tempfile.mkdtemp(prefix="qwen2audio-lora-bench-"))
    checkpoint = build_checkpoint(root / "mid", text_dims=TEXT, audio_dims=AUDIO)
    options = EngineOptions(max_loras=ADAPTERS, max_lora_rank=args.rank, enable_prefix_cache=False,
                            encoder_cache_bytes=0)
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", progress=False, engine_options=options)
    names = [model.load_adapter(write_lora(root / f"adapter{k}", checkpoint, args.rank, k), f"adapter{k}")
             for k in range(ADAPTERS)]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {model.dtype}; 8 requests x {args.new_tokens} tokens, rank {args.rank}")
    rng = np.random.default_rng(1)
    warm = model.processor.prepare_many(conversations(SECONDS[:2], rng)[0])
    timed(model, warm, 4)
    times: dict[str, list[float]] = {"base": [], "adapters": []}
    for repeat in range(args.repeats):
        prompts = model.processor.prepare_many(conversations(SECONDS, rng)[0])
        sides = {"base": prompts,
                 "adapters": [replace(p, adapter=names[k % ADAPTERS]) for k, p in enumerate(prompts)]}
        for side in (("base", "adapters") if repeat % 2 == 0 else ("adapters", "base")):
            times[side].append(timed(model, sides[side], args.new_tokens))
            print(f"  repeat {repeat + 1}: {side:8s} {times[side][-1]:6.2f} s", flush=True)
    base, lora = statistics.median(times["base"]), statistics.median(times["adapters"])
    tokens = 8 * args.new_tokens
    print(f"base model:            {base:6.2f} s  {tokens / base:6.1f} tok/s")
    print(f"4 adapters (2 each):   {lora:6.2f} s  {tokens / lora:6.1f} tok/s")
    print(f"slowdown: {lora / base:.3f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
