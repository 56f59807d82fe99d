"""Our CPU decode kernels (model/cpu_kernels.py) against torch's, side by side: int8 against
``_weight_int8pack_mm``, int4 (groups of 128) against ``_weight_int4pack_mm_for_cpu``, decode
attention over the paged bfloat16 KV cache against the eager path (gather, widen, two products).

    python bench/cpu_kernels.py [--scheme int8|int4|attention] [--threads 2] [--repeats 30] [--rows 1,4,16]
                                [--context 800]

On the decoder shapes of the mid-size checkpoint bench/llamacpp.py uses (hidden 896: fused qkv,
gate_up, down, the 151,936-word output layer) and of Qwen2-Audio-7B (hidden 4096). A decode step
reads every weight once from memory, so each call here takes the next of enough copies of the weight
to overflow the last-level cache (cold weights, as in a real step); the floor is the machine's memory
read rate, measured first (a sum over 400 MB). Prints ms per call, GB/s of codes read and the ratio.
Both kernels get bfloat16 activations; the error column is the worse of the two against a float64
product of the weights they hold (int8: the bfloat16 rounding; int4: ours also rounds activations to
int8 per 32 inputs, torch's does not).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch

from lowbit_kernels import timed  # bench/ is the script's own directory

SHAPES = {  # name: (out_features, in_features)
    "mid qkv": (1152, 896), "mid gate_up": (9728, 896), "mid down": (896, 4864), "mid head": (151936, 896),
    "7B qkv": (12288, 4096), "7B gate_up": (22016, 4096), "7B down": (4096, 11008),
}
COLD_BYTES = 400e6


def read_rate(repeats: int) -> float:
    """GB/s of a plain sum over 400 MB: what the cores can stream from memory."""
    data = torch.ones(int(COLD_BYTES) // 4)
    return COLD_BYTES / 1e9 / timed(data.sum, repeats)


def compare(scheme: str, name: str, rows: int, repeats: int) -> tuple[float, float, float]:
    """(ours ms, torch's ms, worse relative error of the two against float64)."""
    out_features, in_features = SHAPES[name]
    copies = max(2, int(COLD_BYTES // (out_features * in_features * (1 if scheme == "int8" else 0.5))))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    ours, torchs, expected = (int8_pair if scheme == "int8" else int4_pair)(out_features, in_features, copies,
                                                                             generator)
    reference = x.double() @ expected.T
    error = max(((run(x, 0).double() - reference).norm() / reference.norm()).item() for run in (ours, torchs))
    turn = iter(range(10**9))
    with torch.inference_mode():
        return (timed(lambda: ours(x, next(turn) % copies), repeats),
                timed(lambda: torchs(x, next(turn) % copies), repeats), error)


Kernel = Callable[[torch.Tensor, int], torch.Tensor]


def int8_pair(out_features: int, in_features: int, copies: int, generator: torch.Generator
              ) -> tuple[Kernel, Kernel, torch.Tensor]:
    """Both int8 kernels over ``copies`` weights, and the float64 weight the first copy stands for."""
    from qwen2audio.model import cpu_kernels

    weights = [torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
               for _ in range(copies)]
    scales = torch.rand(out_features, generator=generator).to(torch.bfloat16) / 100
    ours_scales = scales.float()
    return (lambda x, n: cpu_kernels.int8_linear(x, weights[n], ours_scales),
            lambda x, n: torch.ops.aten._weight_int8pack_mm(x, weights[n], scales),
            weights[0].double() * scales.double()[:, None])


def int4_pair(out_features: int, in_features: int, copies: int, generator: torch.Generator
              ) -> tuple[Kernel, Kernel, torch.Tensor]:
    """Both int4 kernels (groups of 128) over ``copies`` weights, and the first copy's float64 weight."""
    from qwen2audio.model import cpu_kernels, quant, quant_cuda

    group = 128
    codes = [torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
             for _ in range(copies)]
    scales = (torch.rand(out_features, in_features // group, generator=generator) / 100).to(torch.bfloat16)
    zeros = (torch.randn(out_features, in_features // group, generator=generator) / 100).to(torch.bfloat16)
    lanes = [quant.lanes_layout(quant.pack_int4(c)) for c in codes]
    ours_sz = quant.lanes_scales(scales, zeros)
    theirs = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1) for c in codes]
    theirs_sz = quant_cuda.scales_and_zeros(scales, zeros, torch.bfloat16)
    groups = (codes[0].double() - 8).reshape(out_features, -1, group)
    weight = groups * scales.double()[..., None] + zeros.double()[..., None]
    return (lambda x, n: cpu_kernels.int4_linear(x, lanes[n], ours_sz, group),
            lambda x, n: torch.ops.aten._weight_int4pack_mm_for_cpu(x, theirs[n], group, theirs_sz),
            weight.reshape(out_features, in_features))


ATTENTION_SHAPES = {"mid": (14, 2, 64), "7B": (32, 32, 128)}  # query heads, KV heads, head size


def attention(name: str, rows: int, context: int, repeats: int) -> tuple[float, float, float, float]:
    """(ours ms, eager ms, relative difference, GB of cache read): ``rows`` sequences of ``context``
    positions each, their blocks scattered through the cache."""
    from qwen2audio.model import cpu_kernels
    from qwen2audio.model.attention import _decode_attention_cpu, _gather

    heads, kv_heads, dim = ATTENTION_SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    per_row = -(-context // 16)
    size = 2 * rows * context * kv_heads * dim * 2
    caches = [tuple(torch.randn(rows * per_row, 16, kv_heads, dim, generator=generator).to(torch.bfloat16)
                    for _ in range(2)) for _ in range(max(2, int(COLD_BYTES // size)))]
    tables = torch.randperm(rows * per_row, generator=generator).reshape(rows, per_row)
    lengths = torch.full((rows,), context, dtype=torch.int32)
    query = torch.randn(rows, heads, dim, generator=generator).to(torch.bfloat16)

    def ours(n: int) -> torch.Tensor:
        return cpu_kernels.decode_attention(query, *caches[n], tables, lengths)

    def eager(n: int) -> torch.Tensor:
        keys, values = (_gather(cache, tables, torch.float32).flatten(1, 2) for cache in caches[n])
        return _decode_attention_cpu(query, keys, values, lengths)

    reference = eager(0).double()
    error = ((ours(0).double() - reference).norm() / reference.norm()).item()
    turn = iter(range(10**9))
    with torch.inference_mode():
        return (timed(lambda: ours(next(turn) % len(caches)), repeats),
                timed(lambda: eager(next(turn) % len(caches)), repeats), error, size / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=("int8", "int4", "attention"), default="int8")
    parser.add_argument("--context", type=int, default=800, help="attention: positions per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qwen2audio.model import cpu_kernels

    if not cpu_kernels.available():
        raise SystemExit(f"the kernels cannot run: {cpu_kernels._unusable() or cpu_kernels._built()}")
    machine = platform.processor() or platform.machine()
    print(f"{args.scheme}: torch {torch.__version__}, {args.threads} threads, {machine}; "
          f"memory read rate {read_rate(args.repeats):.1f} GB/s")
    if args.scheme == "attention":
        return print_attention(args)
    print("| shape (out x in) | rows | ours ms (GB/s) | torch's ms (GB/s) | ours vs torch's | worse rel. error |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        size = SHAPES[name][0] * SHAPES[name][1] / 1e9 / (1 if args.scheme == "int8" else 2)
        for rows in map(int, args.rows.split(",")):
            ours, torchs, error = compare(args.scheme, name, rows, args.repeats)
            print(f"| {name} {SHAPES[name][0]} x {SHAPES[name][1]} | {rows} | {1e3 * ours:.2f} ({size / ours:.1f}) "
                  f"| {1e3 * torchs:.2f} ({size / torchs:.1f}) | {torchs / ours:.2f}x | {error:.1e} |", flush=True)


def print_attention(args: argparse.Namespace) -> None:
    print("| heads, KV heads, size | sequences x positions | ours ms (GB/s) | eager ms (GB/s) | ours vs eager "
          "| rel. difference |")
    print("|---|---|---|---|---|---|")
    for name in ATTENTION_SHAPES if args.shapes == ",".join(SHAPES) else args.shapes.split(","):
        for rows in map(int, args.rows.split(",")):
            ours, eager, error, size = attention(name, rows, args.context, args.repeats)
            print(f"| {name} {ATTENTION_SHAPES[name]} | {rows} x {args.context} | {1e3 * ours:.2f} ({size / ours:.1f}) "
                  f"| {1e3 * eager:.2f} ({size / eager:.1f}) | {eager / ours:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
