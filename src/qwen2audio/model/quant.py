"""Weight-only int8 and int4 linear layers for the decoder (issue 18, a first step).

Owns the quantization formulas, the packed storage torch's CPU kernels take, and the choice between
the integer kernels (decode-sized row counts, where a step streams every weight once and speed
follows bytes) and a bf16 GEMM on the dequantized weight (long prefill chunks, which are
compute-bound: bench/lowbit_kernels.py measured the integer kernels 2-5x slower there). Rows are
quantized independently, so a fused weight (qkv, gate_up) can be filled piece by piece as a loader
reads its parts.

int8: symmetric, one scale per output channel, w = q * scale.
int4: asymmetric, groups of ``group_size`` along the input, w = (q - 8) * scale + zero with q in
0..15 (torch's kernel's form; zero = the group's minimum + 8 * scale).
The kernels read scales and zeros in bfloat16, so both are rounded to bfloat16 before the codes are
chosen: the codes then fit the values the kernel multiplies by. (Rounding a zero afterwards moves a
whole group by up to 2^-9 of it, which with outlier channels cost 1-4% of a layer's output.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Scheme = Literal["int8", "int4"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
GROUP_SIZES = (32, 64, 128)
DECODE_ROWS = 16  # at most this many rows take the integer kernels; more dequantize for a bf16 GEMM


@dataclass(frozen=True)
class QuantConfig:
    scheme: Scheme
    group_size: int = 128  # int4 only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {self.group_size}")


class QuantizedLinear(nn.Module):
    """``F.linear(x, W, b)`` with W held as int8 or int4 codes; ``bias`` and outputs in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.scheme == "int4" and in_features % config.group_size:
            raise ValueError(f"int4 groups of {config.group_size} do not divide a layer of {in_features} inputs")
        self.in_features, self.out_features, self.config, self.dtype = in_features, out_features, config, dtype
        if config.scheme == "int8":
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        else:
            groups = in_features // config.group_size
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, dtype: torch.dtype = torch.bfloat16
                   ) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, config, linear.bias is not None, dtype,
                    linear.weight.device)
        layer.load_rows(0, linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def load_rows(self, start: int, weight: torch.Tensor) -> None:
        """Quantize rows ``start : start + len(weight)`` of the float weight into place."""
        rows = slice(start, start + weight.shape[0])
        weight = weight.to(self.codes.device, torch.float32)
        if self.config.scheme == "int8":
            scales = _bf16_exact(weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
            self.codes[rows] = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
            self.scales[rows] = scales
        else:
            groups = weight.reshape(weight.shape[0], -1, self.config.group_size)
            low, high = groups.amin(dim=2), groups.amax(dim=2)
            scales = _bf16_exact((high - low).clamp(min=1e-12) / 15.0)
            zeros = _bf16_exact(low + 8 * scales)
            codes = torch.round((groups - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
            self.codes[rows] = codes.reshape(weight.shape).to(torch.uint8)
            self.scales[rows], self.zeros[rows] = scales, zeros
        self._packed = None

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the codes stand for, [out, in]."""
        if self.config.scheme == "int8":
            weight = self.codes.float() * self.scales[:, None]
        else:
            groups = self.codes.float().reshape(self.out_features, -1, self.config.group_size) - 8
            weight = (groups * self.scales[..., None] + self.zeros[..., None]).reshape(self.out_features, -1)
        return weight.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or rows > DECODE_ROWS:
            return F.linear(x.to(self.dtype), self.dequantized(), self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        codes, scales = self._kernel_operands()
        if self.config.scheme == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, codes, scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, codes, self.config.group_size, scales)
        out = out.to(self.dtype).reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def _kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and scales in the layout torch's CPU kernels take, made once after loading."""
        if self._packed is None:
            if self.config.scheme == "int8":
                self._packed = self.codes, self.scales.to(torch.bfloat16)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32), 1)
                scales_and_zeros = torch.stack([self.scales, self.zeros], dim=2).transpose(0, 1).contiguous()
                self._packed = packed, scales_and_zeros.to(torch.bfloat16)
        return self._packed

    def extra_repr(self) -> str:
        group = f", group {self.config.group_size}" if self.config.scheme == "int4" else ""
        return f"{self.in_features} -> {self.out_features}, {self.config.scheme}{group}"


def _bf16_exact(values: torch.Tensor) -> torch.Tensor:
    """Float32 values rounded to the nearest bfloat16 (what the kernels will read)."""
    return values.to(torch.bfloat16).float()
