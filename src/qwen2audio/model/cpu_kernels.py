"""The CPU decode kernels (csrc/): int8 and int4 weights, attention on the paged KV cache. Built on
first use, used where they can run.

Owns finding out whether this machine can run the kernels, building them once per machine (C++
through torch's extension builder, ``-march=native``, cached under ``~/.cache/qwen2audio``), and the
``torch.ops.qwen2audio_cpu`` operators they register (``int8_linear``, ``int4_linear``,
``decode_attention``). Anything short of that (no compiler, a CPU without AVX-512, not Linux,
``QWEN2AUDIO_CPU_KERNELS=0``) leaves torch's own kernels in charge (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, gathered batched products), which are slower: a warning says why, once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(pathlib.Path(__file__).with_name("csrc") / name for name in ("int8_linear.cpp", "int4_linear.cpp",
                                                                                  "decode_attention.cpp"))
BLOCK = 64  # the int8 kernel's activation block: a layer's input width must be a multiple
LONGEST = 8192  # wider inputs (the 7B's down_proj) stay on torch's int8 kernel, faster there
LANES = 16  # the int4 kernel's block of output rows
_NEEDS = ("avx512f", "avx512bw")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def fits(in_features: int) -> bool:
    """Whether a layer of this input width can take the int8 kernel (for some row counts), if the machine can."""
    return in_features % BLOCK == 0 and in_features <= LONGEST


def suits(rows: int, in_features: int) -> bool:
    """Whether the int8 kernel is the faster one for ``rows`` rows into a layer that :func:`fits`: where
    the rows' int16 codes stay in L1 beside the weights (bench/cpu_kernels.py; beyond that, torch's
    kernel, which interleaves rows, wins)."""
    return in_features <= 1024 or rows * in_features <= LONGEST


@torch.compiler.assume_constant_result  # a compiled decode step decides once, when it is traced
def available() -> bool:
    """Whether the kernels are built and loaded in this process (building them the first time: ~60 s)."""
    reason = _unusable() or _built()
    if reason:
        _warn(reason)
    return not reason


@functools.cache
def _built() -> str:
    """An empty string once built and loaded, else why not (cached: a process builds and registers it once)."""
    try:
        _build()
        ops = torch.ops.qwen2audio_cpu
        built = ops.int8_available() and ops.int4_available() and ops.attention_available()
        return "" if built else "it was compiled without AVX-512"
    except Exception as exc:  # a compiler error, a missing ninja: torch's slower kernels still work
        return f"it could not be built ({type(exc).__name__}: {' '.join(str(exc).split())[-300:]})"


@functools.cache
def _warn(reason: str) -> None:
    if reason != "QWEN2AUDIO_CPU_KERNELS=0":
        logger.warning("CPU decode steps run on torch's kernels, the slower ones: %s", reason)


def _unusable() -> str | None:
    """Why the kernels cannot run here (None: they can). Asked on every decode step's attention, so
    only the environment variable is read each time."""
    if os.environ.get("QWEN2AUDIO_CPU_KERNELS", "1") == "0":
        return "QWEN2AUDIO_CPU_KERNELS=0"
    return _machine_lacks()


@functools.cache
def _machine_lacks() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    missing = [flag for flag in _NEEDS if flag not in cpu_flags()]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _build() -> None:
    """Compile (or take the cached build for this source, torch and CPU) and load the operator library."""
    from torch.utils import cpp_extension

    compile_flags = ["-O3", "-march=native", "-fopenmp"]
    flags = sorted(flag for flag in cpu_flags() if flag.startswith(("avx", "amx")))
    sources = [source.read_text() for source in SOURCES]
    tag = hashlib.sha256(" ".join([*sources, torch.__version__, *compile_flags, *flags]).encode()).hexdigest()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    directory = cache / "qwen2audio" / "cpu-kernels" / tag[:16]
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "qwen2audio_cpu.so").is_file():
        logger.info("building the CPU decode kernels for this machine (once, about a minute)")
    cpp_extension.load("qwen2audio_cpu", [str(source) for source in SOURCES], extra_cflags=compile_flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                       verbose=False)
    torch.library.register_fake("qwen2audio_cpu::int8_linear")(_fake)
    torch.library.register_fake("qwen2audio_cpu::int4_linear")(_fake)
    torch.library.register_fake("qwen2audio_cpu::decode_attention")(_fake_attention)


def _fake(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_attention(query: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(query)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float) times int8 codes [N, K] scaled per row by ``scales`` [N] -> [M, N] in x's dtype."""
    return torch.ops.qwen2audio_cpu.int8_linear(x, weight, scales)


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a layer of this shape can take the int4 kernel (whole 16-row blocks, whole groups)."""
    return out_features % LANES == 0 and group_size % 32 == 0 and in_features % group_size == 0


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] (float) times int4 codes in lanes order (quant.lanes_layout) with their bfloat16 scales and
    zeros [N / 16, K / group, 2, 16] -> [M, N] in x's dtype."""
    return torch.ops.qwen2audio_cpu.int4_linear(x, weight, scales_zeros, group_size)


ATTENTION_DTYPES = (torch.float32, torch.bfloat16)


def attention_fits(query: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether decode attention of this query over this cache can take the kernel (building it if need be)."""
    return (query.device.type == "cpu" and query.dtype in ATTENTION_DTYPES and cache.dtype in ATTENTION_DTYPES
            and query.shape[-1] % 16 == 0 and available())


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """query [D, H, d], caches [blocks, block_size, KVH, d], block tables [D, B], lengths [D] -> [D, H, d]:
    each sequence's query over its first ``lengths[s]`` cached keys, read in place."""
    return torch.ops.qwen2audio_cpu.decode_attention(query.contiguous(), k_cache, v_cache, tables, lengths)
