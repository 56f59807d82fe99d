"""The CUDA side of quantized layers: which GPUs have a kernel for which scheme, the operand layouts
those kernels take, and the products themselves.

- int4: torch's tinygemm (``_weight_int4pack_mm``, sm80+), the same (q - 8) * scale + zero
  groups as the CPU kernel; its packed layout replaces the row-major codes on the GPU (half the
  memory of keeping both), so every row count runs it.
- int8: torch's ``_weight_int8pack_mm`` for decode rows where this torch build has it for CUDA
  (probed once: older builds lack it, and then int8 on CUDA is refused at load); a GEMM on the
  dequantized weight for prefill chunks.
- fp8 (sm89+): weights in float8 e4m3 with one scale per output row; each activation row is scaled
  into e4m3 on the fly and ``torch._scaled_mm`` multiplies with both row scales (vLLM's dynamic
  per-token fp8).

Nothing here runs without a GPU; the layouts and checks are plain functions tested on the CPU.
"""

from __future__ import annotations

import functools

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INNER_K_TILES = 8  # tinygemm's tiling along the input: inputs must be a multiple of 16 * 8
NEEDS = {"int8": (8, 0), "int4": (8, 0), "fp8": (8, 9)}


def device_problem(scheme: str, device: torch.device, capability: tuple[int, int] | None = None,
                   int8_kernel: bool | None = None) -> str | None:
    """Why ``scheme`` cannot run on ``device`` (None: it can). ``capability`` and ``int8_kernel``
    default to the device's own (given explicitly in tests)."""
    if device.type == "cpu":
        if scheme == "fp8":
            return "fp8 weights need an NVIDIA GPU of compute capability 8.9 or newer; on a CPU use int8 or int4"
        if scheme == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"int4 weights on a CPU need torch 2.6 or newer (this is {torch.__version__}): use int8"
        return None
    capability = capability or torch.cuda.get_device_capability(device)
    if capability < NEEDS[scheme]:
        need = ".".join(map(str, NEEDS[scheme]))
        have = ".".join(map(str, capability))
        return f"{scheme} weights need a GPU of compute capability {need} or newer; this one is {have}" + (
            ": use int8 or int4" if scheme == "fp8" and capability >= (8, 0) else "")
    if scheme == "int8" and not (int8_kernel if int8_kernel is not None else has_int8_kernel(device)):
        return (f"torch {torch.__version__} has no CUDA kernel for int8 weights (_weight_int8pack_mm): "
                f"use int4 or fp8 on this GPU")
    return None


@functools.cache
def has_int8_kernel(device: torch.device) -> bool:
    """Whether this torch build runs ``_weight_int8pack_mm`` on ``device`` (a CUDA device). Without
    it, int8 decoders are refused; the int8 output layer of the other schemes takes the GEMM path."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32, dtype=torch.bfloat16, device=device),
                                           torch.zeros(32, 32, dtype=torch.int8, device=device),
                                           torch.ones(32, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def tinygemm_input(packed: torch.Tensor) -> torch.Tensor:
    """Our two-codes-a-byte rows (input 2j in the low nibble) -> the uint8 [out, in / 2] that
    ``_convert_weight_to_int4pack`` takes, which holds input 2j in the high nibble."""
    return (packed >> 4) | (packed << 4)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[out, groups] scales and zeros -> the [groups, out, 2] tensor both int4 kernels read."""
    return torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous().to(dtype)


def int4_operands(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's packed weight and scales/zeros (bf16: the only activation dtype it takes)."""
    weight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_input(packed).contiguous(), INNER_K_TILES)
    return weight, scales_and_zeros(scales, zeros, torch.bfloat16)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm(flat, weight, group_size, scales_zeros)
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation rows [M, K] -> (e4m3 rows, float32 scales [M, 1]) with x ~= rows * scales."""
    scales = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] e4m3 * weight_scales [1, N] float32)^T on the fp8 tensor cores.
    Row-wise scaled products only output bf16 (torch's CUTLASS path), so other dtypes convert."""
    flat, scales = fp8_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(flat, weight.t(), scale_a=scales, scale_b=weight_scales,
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)
