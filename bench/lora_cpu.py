"""LoRA serving cost on the CPU: 8 concurrent requests spread over 4 adapters against the same 8 on
the base model, one engine, side by side in one run.

    python bench/lora_cpu.py [--new-tokens 64] [--repeats 3] [--rank 16] [--dtype auto]

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


def product_variants(rows: int, inputs: int, outputs: int, rank: int, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds of one layer's batched low-rank product, rows spread over ADAPTERS adapters, by
    three torch formulations: the masked wide product model/lora.py uses (fixed shapes, no host
    work), a loop over the adapters present (gather, two products, scatter-add), and per-row
    gathered factors with batched products (vLLM's BGMV shape)."""
    x = torch.randn(rows, inputs, dtype=dtype)
    a = torch.randn(inputs, ADAPTERS * rank, dtype=dtype)
    b = torch.randn(ADAPTERS * rank, outputs, dtype=dtype)
    slots = torch.arange(rows) % ADAPTERS
    columns = torch.arange(ADAPTERS * rank) // rank
    per_a, per_b = a.view(inputs, ADAPTERS, rank).permute(1, 0, 2), b.view(ADAPTERS, rank, outputs)

    def masked() -> torch.Tensor:
        return torch.where(slots[:, None] == columns, x @ a, 0) @ b

    def grouped() -> torch.Tensor:
        out = torch.zeros(rows, outputs, dtype=dtype)
        for slot in range(ADAPTERS):
            index = (slots == slot).nonzero().squeeze(1)
            out.index_add_(0, index, (x[index] @ per_a[slot]) @ per_b[slot])
        return out

    def gathered() -> torch.Tensor:
        low = torch.bmm(x[:, None, :], per_a[slots])  # [rows, 1, rank]
        return torch.bmm(low, per_b[slots])[:, 0]

    assert torch.allclose(masked(), grouped(), rtol=1e-2, atol=1e-2 * rank)
    figures = {}
    for name, variant in (("masked wide", masked), ("grouped loop", grouped), ("gathered bmm", gathered)):
        if name == "gathered bmm" and rows > 64:  # [rows, in, rank] copies of A: too large for prefills
            continue
        variant()
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < 0.3:
            variant()
            count += 1
        figures[name] = 1e6 * (time.perf_counter() - started) / count
    return figures


def compare_products(rank: int, dtype: torch.dtype) -> None:
    hidden, inter = TEXT["hidden_size"], TEXT["intermediate_size"]
    kv = hidden // TEXT["num_attention_heads"] * TEXT["num_key_value_heads"]
    print(f"one layer's low-rank product, {ADAPTERS} adapters x rank {rank}, {dtype} (microseconds):")
    for rows in (8, 1024):
        for label, (inputs, outputs) in (("qkv", (hidden, hidden + 2 * kv)), ("gate_up", (hidden, 2 * inter)),
                                         ("down", (inter, hidden))):
            figures = product_variants(rows, inputs, outputs, rank * (3 if label == "qkv" else 1), dtype)
            print(f"  {rows:5d} rows {label:8s}" + "".join(f"  {k}: {v:8.1f}" for k, v in figures.items()))


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
    parser.add_argument("--dtype", default="auto", help="auto (this CPU's default), float32 or bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = pathlib.Path(tempfile.mkdtemp(prefix="qwen2audio-lora-bench-"))
    checkpoint = build_checkpoint(root / "mid", text_dims=TEXT, audio_dims=AUDIO)
    options = EngineOptions(max_loras=ADAPTERS, max_lora_rank=args.rank, enable_prefix_cache=False,
                            encoder_cache_bytes=0)
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", dtype=args.dtype, progress=False,
                                       engine_options=options)
    compare_products(args.rank, model.dtype)
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
