"""Our CPU int8 decode kernel (model/cpu_int8.py) against torch's ``_weight_int8pack_mm``, side by side.

    python bench/int8_kernels.py [--threads 2] [--repeats 30] [--rows 1,4,16]

On the decoder shapes of the mid-size checkpoint bench/llamacpp.py uses (hidden 896: fused qkv,
gate_up, down, the 151,936-word output layer) and of Qwen2-Audio-7B (hidden 4096). A decode step
reads every weight once from memory, so each call here takes the next of enough copies of the weight
to overflow the last-level cache (cold weights, as in a real step); the floor is the machine's memory
read rate, measured first (a sum over 400 MB). Prints ms per call, GB/s of codes read and the ratio.
Both kernels get bfloat16 activations and agree with a float64 product to the bfloat16 rounding.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {  # name: (out_features, in_features)
    "mid qkv": (1152, 896), "mid gate_up": (9728, 896), "mid down": (896, 4864), "mid head": (151936, 896),
    "7B qkv": (12288, 4096), "7B gate_up": (22016, 4096), "7B down": (4096, 11008),
}
COLD_BYTES = 400e6


def timed(run: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def read_rate(repeats: int) -> float:
    """GB/s of a plain sum over 400 MB: what the cores can stream from memory."""
    data = torch.ones(int(COLD_BYTES) // 4)
    return COLD_BYTES / 1e9 / timed(data.sum, repeats)


def compare(name: str, rows: int, repeats: int) -> tuple[float, float, float]:
    """(ours ms, torch's ms, worse relative error of the two against float64)."""
    from qwen2audio.model import cpu_int8

    out_features, in_features = SHAPES[name]
    copies = max(2, int(COLD_BYTES // (out_features * in_features)))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
               for _ in range(copies)]
    scales = torch.rand(out_features, generator=generator).to(torch.bfloat16) / 100
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    expected = (x.double() @ weights[0].double().T) * scales.double()
    ours_scales = scales.float()
    turn = iter(range(10**9))

    def ours() -> torch.Tensor:
        return cpu_int8.int8_linear(x, weights[next(turn) % copies], ours_scales)

    def torchs() -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, weights[next(turn) % copies], scales)

    error = max(((run().double() - expected).norm() / expected.norm()).item()
                for run in (lambda: cpu_int8.int8_linear(x, weights[0], ours_scales),
                            lambda: torch.ops.aten._weight_int8pack_mm(x, weights[0], scales)))
    with torch.inference_mode():
        return timed(ours, repeats), timed(torchs, repeats), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qwen2audio.model import cpu_int8

    if not cpu_int8.available():
        raise SystemExit(f"the kernel cannot run here: {cpu_int8._unusable() or cpu_int8._built()}")
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"memory read rate {read_rate(args.repeats):.1f} GB/s")
    print("| shape (out x in) | rows | ours ms (GB/s) | torch's ms (GB/s) | ours vs torch's | worse rel. error |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        size = SHAPES[name][0] * SHAPES[name][1] / 1e9
        for rows in map(int, args.rows.split(",")):
            ours, torchs, error = compare(name, rows, args.repeats)
            print(f"| {name} {SHAPES[name][0]} x {SHAPES[name][1]} | {rows} | {1e3 * ours:.2f} ({size / ours:.1f}) "
                  f"| {1e3 * torchs:.2f} ({size / torchs:.1f}) | {torchs / ours:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
