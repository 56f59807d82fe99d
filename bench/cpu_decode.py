"""Our CPU decode speed per weight format, eager and compiled, against the bytes each token reads.

    python bench/cpu_decode.py [--work /tmp/llamacpp-bench] [--repeats 2] [--new-tokens 64]
                               [--configs float32 bfloat16 bfloat16+compile int8 int8+compile ...]

Same mid-size random checkpoint, clip and question as bench/llamacpp.py (it writes the checkpoint
if ``--work`` has none), 2 threads, each configuration in a fresh process, interleaved over
``--repeats`` rounds (median). A decode step streams every decoder and output-layer weight once,
so the printed floor is those bytes over the rate this machine reads memory at (measured here,
2 threads summing a 1 GiB buffer): what "as fast as its bytes allow" means, per format.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from llamacpp import AUDIO, SPEECH, TEXT, legacy_names, run_ours

CONFIGS = ["float32", "bfloat16", "bfloat16+compile", "int8", "int8+compile", "int4", "int4+compile"]
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 2 / 896, "int4": 0.5 + 4 / 128}


def memory_rate() -> float:
    """Bytes a second two threads read (the best of 5 sums over 1 GiB)."""
    torch.set_num_threads(2)
    buffer = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def weights_per_token() -> tuple[int, int]:
    """(decoder linear weights, output-layer weights) one decode step reads."""
    hidden, inter, layers = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"]
    head_dim = hidden // TEXT["num_attention_heads"]
    qkv = hidden * (TEXT["num_attention_heads"] + 2 * TEXT["num_key_value_heads"]) * head_dim
    per_layer = qkv + hidden * hidden + 3 * hidden * inter
    return layers * per_layer, TEXT["vocab_size"] * hidden


def floor_tok_s(config: str, rate: float) -> float:
    scheme = config.split("+")[0]
    decoder, head = weights_per_token()
    head_bytes = head * (BYTES_PER_WEIGHT["int8"] if scheme in ("int8", "int4") else BYTES_PER_WEIGHT[scheme])
    return rate / (decoder * BYTES_PER_WEIGHT[scheme] + head_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/llamacpp-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()
    checkpoint = args.work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
        from checkpoints import build_checkpoint

        build_checkpoint(checkpoint, real_vocab=True, text_dims=TEXT, audio_dims=AUDIO, tokenizer_json=True)
        legacy_names(checkpoint)
    speech, rate = soundfile.read(SPEECH, dtype="float32")
    clip = args.work / "clip-10s.wav"
    soundfile.write(clip, np.resize(speech, 10 * rate), rate)
    memory = memory_rate()
    print(f"memory read rate, 2 threads: {memory / 1e9:.1f} GB/s", flush=True)
    runs: dict[str, list[float]] = {config: [] for config in args.configs}
    for _ in range(args.repeats):  # interleaved, so drifts in the machine hit every configuration
        for config in args.configs:
            scheme, _, compiled = config.partition("+")
            result = run_ours(checkpoint, scheme, clip, args.new_tokens, False, bool(compiled))
            runs[config].append(result["decode_tok_s"])
            print(json.dumps({"config": config, **result}), flush=True)
    base = statistics.median(runs["float32"]) if "float32" in runs else None
    print("\n| weights / step | decode tok/s (median) | runs | vs float32 | floor from bytes | share of floor |")
    print("|---|---|---|---|---|---|")
    for config, rates in runs.items():
        median, floor = statistics.median(rates), floor_tok_s(config, memory)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {config} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates)} | {ratio} | {floor:.1f} "
              f"| {median / floor:.0%} |")


if __name__ == "__main__":
    main()
