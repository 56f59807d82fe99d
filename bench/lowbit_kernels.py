"""Which CPU matmul to build int8/int4 weights on (issue 18's groundwork): torch's weight-only
kernels against the float layers we run today, on Qwen2-Audio-7B's decoder shapes (hidden 4096,
32 heads x 128 with as many KV heads, intermediate 11008, 156,032 words).

For each shape (fused qkv, o_proj, fused gate_up, down_proj, the output head) and row count (1 and 8
rows: decode steps; 256: a prefill chunk) it times F.linear in float32 and bfloat16, oneDNN's
MkldnnLinear in both (what prepare_network uses), `_weight_int8pack_mm` (int8 per output channel,
bf16 activations) and `_weight_int4pack_mm_for_cpu` (int4, groups of 128), and prints each one's
time and its speed against float32 F.linear. A decode step streams every weight once, so at 1 row the
ratio should approach the bytes saved (2x bf16, 4x int8, 8x int4) when a kernel is good.

    python bench/lowbit_kernels.py [--threads 2] [--repeats 20] [--shapes qkv,o,gate_up,down]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, HEADS_DIM, KV_DIM, INTERMEDIATE, VOCAB = 4096, 4096, 4096, 11008, 156032  # SPEC.md's text_config
SHAPES = {  # name: (out_features, in_features)
    "qkv": (HEADS_DIM + 2 * KV_DIM, HIDDEN),
    "o": (HIDDEN, HEADS_DIM),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
    "head": (VOCAB, HIDDEN),
}
GROUP = 128


def timed(run: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls."""
    run()
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [out, in], bf16 scales [out])."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8), scales.to(torch.bfloat16)


def int4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of GROUP along the input: (packed, scales-and-zeros) as torch's CPU
    int4 kernel takes them."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low).clamp(min=1e-8) / 15.0)
    zeros = low + scales * 8  # torch's convention: w = (q - 8) * scale + zero
    quantized = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    quantized = quantized.reshape(out_features, in_features)  # values 0..15, one per int32
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized, 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def row(name: str, rows: int, repeats: int) -> dict[str, float]:
    out_features, in_features = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    x32 = torch.randn(rows, in_features)
    x16 = x32.to(torch.bfloat16)
    w16 = weight.to(torch.bfloat16)
    q8, s8 = int8_weight(weight)
    q4, sz4 = int4_weight(weight)
    from torch.utils.mkldnn import MkldnnLinear

    dense32 = torch.nn.Linear(in_features, out_features, bias=False)
    dense32.weight.data = weight
    onednn32 = MkldnnLinear(dense32, torch.float32)
    onednn16 = MkldnnLinear(dense32, torch.bfloat16)
    runs = {
        "fp32": lambda: F.linear(x32, weight),
        "bf16": lambda: F.linear(x16, w16),
        "onednn fp32": lambda: onednn32(x32),
        "onednn bf16": lambda: onednn16(x16),
        "int8": lambda: torch.ops.aten._weight_int8pack_mm(x16, q8, s8),
        "int4 g128": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, q4, GROUP, sz4),
    }
    with torch.inference_mode():
        return {label: timed(run, repeats) for label, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", default="qkv,o,gate_up,down,head")
    parser.add_argument("--rows", default="1,8,256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    for name in args.shapes.split(","):
        for rows in map(int, args.rows.split(",")):
            times = row(name, rows, args.repeats)
            base = times["fp32"]
            cells = "  ".join(f"{label} {1e3 * t:7.2f} ms ({base / t:4.2f}x)" for label, t in times.items())
            print(f"{name:8s} {SHAPES[name]!s:15s} rows {rows:4d}: {cells}", flush=True)


if __name__ == "__main__":
    main()
