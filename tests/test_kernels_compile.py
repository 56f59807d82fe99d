"""Every Triton kernel variant the engine launches, compiled for the H100/H200 (sm_90) on the CPU.

Triton's interpreter (test_kernels.py) runs the kernels' logic but not the compiler's rules: a
variable a branch retypes, a dot of the wrong shape or an fp8 conversion the target lacks only
fail when compiled. Compiling needs no GPU: triton.compile lowers to a cubin with the ptxas that
Triton ships. The register use of the decode kernels is checked too (a spill means the launch
shapes in kernels.py need another look).
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("qwen2audio.model.kernels")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces triton.jit functions; compiling needs the real ones", allow_module_level=True)

TARGET = GPUTarget("cuda", 90, 32)
STRIDES = ("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_tb", "stride_len")


def compile_kernel(fn, signature: dict, constants: dict, num_warps: int = 4):
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=TARGET,
                          options={"num_warps": num_warps})


def usage(compiled) -> tuple[int, int]:
    """(registers, stack bytes) per thread, read from the cubin by Triton's cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"])


DTYPES = ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_silu_compile(dtype):
    signature = {"X": f"*{dtype}", "R": f"*{dtype}", "W": f"*{dtype}", "Out": f"*{dtype}", "ResOut": f"*{dtype}",
                 "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "stride_ro": "i32", "n_cols": "i32",
                 "eps": "fp32", "HAS_RES": "constexpr", "BLOCK": "constexpr"}
    for residual in (True, False):
        compile_kernel(kernels._rms_norm, signature, {"HAS_RES": residual, "BLOCK": 4096})
    signature = {"X": f"*{dtype}", "Out": f"*{dtype}", "stride_x": "i32", "stride_o": "i32", "n_cols": "i32",
                 "BLOCK": "constexpr"}
    compile_kernel(kernels._silu_mul, signature, {"BLOCK": 1024})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["same", "fp8e4nv"])
def test_rope_and_decode_attention_compile(dtype, cache):
    cache = dtype if cache == "same" else cache
    limit = 448.0 if cache == "fp8e4nv" else 0.0
    signature = {"QKV": f"*{dtype}", "Cos": f"*{dtype}", "Sin": f"*{dtype}", "Slots": "*i64", "KC": f"*{cache}",
                 "VC": f"*{cache}", "stride_row": "i32", "stride_cos": "i32", "stride_slot": "i32",
                 "HEADS": "constexpr", "KV_HEADS": "constexpr", "HEAD_DIM": "constexpr", "HALF_PAD": "constexpr",
                 "WRITE_CACHE": "constexpr", "LIMIT": "constexpr"}
    for write in (True, False):
        compile_kernel(kernels._rope_cache, signature, {"HEADS": 32, "KV_HEADS": 32, "HEAD_DIM": 128,
                                                        "HALF_PAD": 64, "WRITE_CACHE": write, "LIMIT": limit})
    common = {"Q": f"*{dtype}", "KC": f"*{cache}", "VC": f"*{cache}", "Tables": "*i64", "Lens": "*i64",
              "PartO": "*fp32", "PartM": "*fp32", "PartL": "*fp32", "scale": "fp32", **dict.fromkeys(STRIDES, "i32")}
    tile, warps = kernels.MHA_LAUNCH
    mha = compile_kernel(kernels._decode_split_mha, {**common, **dict.fromkeys(
        ("HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "TILE", "SPLITS"), "constexpr")},
        {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_SIZE": 16, "TILE": tile, "SPLITS": 9}, warps)
    tile, warps = kernels.GQA_LAUNCH
    precision = "ieee" if dtype == "fp32" else "tf32"
    gqa = compile_kernel(kernels._decode_split, {**common, **dict.fromkeys(
        ("GROUP", "GROUP_PAD", "HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "TILE", "SPLITS", "PRECISION"), "constexpr")},
        {"GROUP": 7, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_SIZE": 16, "TILE": tile, "SPLITS": 3,
         "PRECISION": precision}, warps)
    if dtype != "fp32":  # the model's dtypes on a GPU: no register spills at the chosen launch shapes
        assert usage(mha)[1] == 0, usage(mha)
        assert usage(gqa)[1] == 0, usage(gqa)
    merge = {"PartO": "*fp32", "PartM": "*fp32", "PartL": "*fp32", "Out": f"*{dtype}", "stride_ot": "i32",
             "stride_oh": "i32", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "SPLITS": "constexpr",
             "SPLITS_PAD": "constexpr"}
    for splits in (1, 9, 32):
        compile_kernel(kernels._decode_merge, merge, {"HEAD_DIM": 128, "BLOCK_D": 128, "SPLITS": splits,
                                                      "SPLITS_PAD": triton.next_power_of_2(splits)})
