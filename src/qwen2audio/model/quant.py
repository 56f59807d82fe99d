"""Weight-only int8, int4 (and, on recent GPUs, fp8) linear layers for the decoder.

Owns the quantization formulas, the packed storage torch's CPU kernels take, and the choice between
the integer kernels (decode-sized row counts, where a step streams every weight once and speed
follows bytes) and a GEMM on the dequantized weight (long prefill chunks, which are compute-bound:
bench/lowbit_kernels.py measured the integer kernels 2-5x slower there).

Formulas (the saved layout, docs/quantization.md, stores exactly these numbers):
- every layer first divides its input channel j by ``input_scale[j]`` inside the weight and
  multiplies the activation by it at run time, ``W x = (W / s) (s * x)``, with
  ``s_j = sqrt(max_i |W_ij|)`` (normalised to geometric mean 1). Trained weights have a few input
  channels far larger than the rest; without this, one such channel sets the step of every row it
  crosses. Activations stay in floating point, so the product is exact before rounding.
- int8: symmetric, one scale per output channel: ``W' = q * scale``, q in -127..127.
- int4: asymmetric groups of ``group_size`` inputs: ``W' = (q - 8) * scale + zero``, q in 0..15.
- fp8: float8 e4m3 codes, one scale per output channel: ``W' = q * scale`` (GPU kernels: quant_cuda.py).
Scales, zeros and input scales are rounded to bfloat16 before the codes are chosen: the kernels
read them in bfloat16, so the codes fit the values they are multiplied by.

A weight is quantized from pieces of rows read twice (first for the input scale, which needs every
row, then for the codes), so a fused weight (qkv, gate_up) is quantized from its separate
checkpoint tensors and no whole float weight is ever held: the 0.64 G-weight output layer of the 7B
would take 2.6 GB in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from qwen2audio.errors import CheckpointError
from qwen2audio.model import cpu_kernels, quant_cuda

Scheme = Literal["int8", "int4", "fp8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
GROUP_SIZES = (32, 64, 128)
DECODE_ROWS = 16  # at most this many rows take the integer kernels; more dequantize for a GEMM
_DEQUANT_ELEMENTS = 2**22  # a prefill GEMM dequantizes at most this many weights at a time
EQUALIZE_POWER = 0.5
_BLOCK_N = 64  # prefill slices of rows are whole blocks of every CPU int4 layout


@dataclass(frozen=True)
class QuantConfig:
    """Which weight-only scheme, and for int4 the group size along the input."""

    scheme: Scheme
    group_size: int = 128  # int4 only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"not {self.group_size}")

    def label(self) -> str:
        return f"int4-g{self.group_size}" if self.scheme == "int4" else self.scheme

    def describe(self) -> str:
        if self.scheme == "int4":
            return f"int4 (groups of {self.group_size})"
        return f"{self.scheme} (per channel)"


class QuantizedLinear(nn.Module):
    """``F.linear(x, W, b)`` with W held as int8 or int4 codes; outputs in ``dtype`` (the model's)."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.scheme == "int4" and in_features % config.group_size:
            raise ValueError(f"int4 groups of {config.group_size} do not divide a layer of {in_features} inputs")
        self.in_features, self.out_features, self.config, self.dtype = in_features, out_features, config, dtype
        store = dict(device=device)
        if config.scheme != "int4":
            codes = torch.int8 if config.scheme == "int8" else quant_cuda.FP8
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=codes, **store))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, **store))
        else:
            groups = in_features // config.group_size
            # Two codes a byte, row-major: byte j of a row holds inputs 2j (low nibble) and 2j + 1.
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **store))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16, **store))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16, **store))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.bfloat16, **store))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._layout = "rows"  # int4 codes: as saved, or repacked in place for a CPU kernel / tinygemm
        self._prepared = False  # see prepare
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None
        self._own_int8 = False  # int8 decode rows on model/cpu_kernels.py's kernel (else torch's)
        self._scales32: torch.Tensor | None = None  # its scales
        self._scale: torch.Tensor | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, dtype: torch.dtype = torch.bfloat16
                   ) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, config, linear.bias is not None, dtype,
                    linear.weight.device)
        layer.quantize_from(lambda: row_slices(0, linear.weight.detach()))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def quantize_from(self, pieces: Callable[[], Iterable[tuple[int, torch.Tensor]]]) -> None:
        """Quantize the float weight given as (first row, rows) pieces that together cover it once,
        in any order and any float dtype. ``pieces`` is called twice (the input scale needs every
        row before any code is chosen), so a loader can stream the rows from the file twice instead
        of holding the whole float weight: only one piece at a time is ever in floating point."""
        column_max = torch.zeros(self.in_features, device=self.qweight.device)
        for _, rows in pieces():  # rows may be host slices of a checkpoint while the layer is on a GPU
            torch.maximum(column_max, rows.to(column_max.device).abs().amax(dim=0).float(), out=column_max)
        scale = column_max.clamp(min=1e-12) ** EQUALIZE_POWER
        self.input_scale.copy_(scale / scale.log().mean().exp())
        if self._layout != "rows":  # quantized again after prepare: back to the saved layout
            self.qweight = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                       device=self.qweight.device)
            self._layout = "rows"
        for start, rows in pieces():
            self._quantize_rows(start, rows.to(self.qweight.device, torch.float32) / self.input_scale.float())
        self._prepared, self._kernel, self._scale = False, None, None

    def _quantize_rows(self, start: int, weight: torch.Tensor) -> None:
        """Codes, scales (and zeros) of rows ``start:`` from their float values divided by s."""
        rows = slice(start, start + weight.shape[0])
        if self.config.scheme == "int8":
            scales = _bf16_exact(weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
            self.qweight[rows] = torch.round(weight / scales[:, None]).clamp(-127, 127)
            self.scales[rows] = scales
        elif self.config.scheme == "fp8":
            scales = _bf16_exact(weight.abs().amax(dim=1).clamp(min=1e-12) / quant_cuda.FP8_MAX)
            self.qweight[rows] = (weight / scales[:, None]).clamp(-quant_cuda.FP8_MAX, quant_cuda.FP8_MAX).to(
                quant_cuda.FP8)
            self.scales[rows] = scales
        else:
            groups = weight.reshape(weight.shape[0], -1, self.config.group_size)
            low, high = groups.amin(dim=2), groups.amax(dim=2)
            scales = _bf16_exact((high - low).clamp(min=1e-12) / 15.0)
            zeros = _bf16_exact(low + 8 * scales)
            codes = torch.round((groups - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.uint8)
            self.qweight[rows] = pack_int4(codes.reshape(weight.shape[0], -1))
            self.scales[rows], self.zeros[rows] = scales, zeros

    def codes(self) -> torch.Tensor:
        """The codes [out, in] (int8 and fp8 as stored; int4 unpacked, 0..15)."""
        if self.config.scheme != "int4":
            return self.qweight
        if self._layout == "cuda":
            raise RuntimeError("these int4 codes are held in tinygemm's GPU layout only: load the checkpoint on the "
                               "CPU to read or save them")
        return held_codes(self.qweight, self._layout)

    def saved_qweight(self) -> torch.Tensor:
        """``qweight`` in the documented (saved) layout, whichever layout it is held in."""
        return self.qweight if self._layout == "rows" else pack_int4(self.codes())

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the codes stand for, [out, in], input scale multiplied back in."""
        return (self._scaled_weight() * self.input_scale.float()).to(dtype or self.dtype)

    def _scaled_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """W / s (what the codes encode directly) for a range of output rows, in ``dtype``."""
        if self.config.scheme != "int4":
            return self.qweight[rows].to(dtype) * self.scales[rows].to(dtype)[:, None]
        codes = held_codes(self.qweight[rows], self._layout)  # slices on 64 rows keep CPU blocks whole
        groups = codes.to(dtype).reshape(codes.shape[0], -1, self.config.group_size)
        scales = self.scales[rows].float()
        low = (self.zeros[rows].float() - 8 * scales).to(dtype)  # (q - 8) * scale + zero = q * scale + low
        return torch.addcmul(low[..., None], groups, scales.to(dtype)[..., None]).reshape(codes.shape[0], -1)

    def _slice_linear(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """``x @ W[rows]^T + bias[rows]`` on the dequantized slice (x already times s). int8's scale
        is per output, so it multiplies the product instead of every weight (exact codes in bf16)."""
        bias = self.bias[rows] if self.bias is not None else None
        if self.config.scheme == "int8" and self.dtype in (torch.bfloat16, torch.float32):
            out = F.linear(x, self.qweight[rows].to(self.dtype)) * self.scales[rows].to(self.dtype)
            return out + bias if bias is not None else out
        return F.linear(x, self._scaled_weight(self.dtype, rows), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel = self.prepare()
        x = (x if x.dtype == self.dtype else x.to(self.dtype)) * self._scale
        if x.device.type == "cuda":
            return self._cuda_forward(x, rows, *kernel)
        if rows > DECODE_ROWS or kernel is None:
            return self._dequantized_linear(x)
        flat = x.reshape(rows, self.in_features)
        packed, scales = kernel
        if self._own_int8 and cpu_kernels.suits(rows, self.in_features):
            out = cpu_kernels.int8_linear(flat, packed, self._scales32)
        elif self._layout == "lanes":
            out = cpu_kernels.int4_linear(flat, packed, scales, self.config.group_size)
        elif self.config.scheme == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, packed, scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.config.group_size, scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        """A GEMM on the weight dequantized in slices of rows, so that a large layer (the output
        layer is 0.6 G weights in the 7B) never exists whole in floating point."""
        step = max(_BLOCK_N, _DEQUANT_ELEMENTS // self.in_features // _BLOCK_N * _BLOCK_N)
        if step >= self.out_features:
            return self._slice_linear(x, slice(None))
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=self.dtype, device=x.device)
        for start in range(0, self.out_features, step):
            out[..., start:start + step] = self._slice_linear(x, slice(start, start + step))
        return out

    def _cuda_forward(self, x: torch.Tensor, rows: int, packed: torch.Tensor, scales: torch.Tensor
                      ) -> torch.Tensor:
        """See model/quant_cuda.py: tinygemm (int4), torch's int8 kernel for decode rows, fp8 GEMM."""
        if self.config.scheme == "int4":
            out = quant_cuda.int4_linear(x, packed, self.config.group_size, scales)
        elif self.config.scheme == "fp8":
            return quant_cuda.fp8_linear(x, packed, scales, self.bias)
        elif rows <= DECODE_ROWS and quant_cuda.has_int8_kernel(x.device):
            flat = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features), packed, scales)
            out = flat.reshape(*x.shape[:-1], self.out_features)
        else:
            return self._dequantized_linear(x)
        return out + self.bias if self.bias is not None else out

    def prepare(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kernel's operands (codes and scales in its layout; None: no kernel, the GEMM path),
        made once: called when the model loads, so int4's repacking of every code (seconds for the
        7B) happens then and not on the first decode step."""
        if self._prepared:
            return self._kernel
        self._scale = self.input_scale.to(self.dtype)
        if self.qweight.device.type == "cuda":
            if self.config.scheme == "int4":  # replaced, not copied: the codes are most of the memory
                self.qweight, sz = quant_cuda.int4_operands(self.qweight, self.scales, self.zeros)
                self._layout = "cuda"
                self._kernel = self.qweight, sz
            else:
                self._kernel = self.qweight, (self.scales.float()[None, :] if self.config.scheme == "fp8"
                                              else self.scales.to(self.dtype))
        elif self.dtype not in (torch.float32, torch.bfloat16) or self.config.scheme == "fp8":
            self._kernel = None
        elif self.config.scheme == "int8":
            self._own_int8 = cpu_kernels.fits(self.in_features) and cpu_kernels.available()
            self._scales32 = self.scales.float() if self._own_int8 else None
            self._kernel = self.qweight, self.scales.to(self.dtype)
        elif cpu_kernels.int4_fits(self.out_features, self.in_features, self.config.group_size) and \
                cpu_kernels.available():
            self.qweight = lanes_layout(self.qweight)  # in place of the saved layout
            self._layout = "lanes"
            self._kernel = self.qweight, lanes_scales(self.scales, self.zeros)
        elif self.out_features % _BLOCK_N == 0 and cpu_int4_format() is not None:
            self.qweight = cpu_int4_layout(self.qweight, cpu_int4_format())  # in place of the saved layout
            self._layout = "cpu"
            self._kernel = self.qweight, quant_cuda.scales_and_zeros(self.scales, self.zeros, self.dtype)
        self._prepared = True
        return self._kernel

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.config.describe()}"


def row_slices(start: int, weight: torch.Tensor, elements: int = 2**22) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) slices of an in-memory weight, at most ``elements`` values each."""
    step = max(1, elements // weight.shape[1])
    for first in range(0, weight.shape[0], step):
        yield start + first, weight[first:first + step]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] in 0..15 -> [out, in / 2], input 2j in the low nibble of byte j."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``."""
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)


# The layouts torch's _convert_weight_to_int4pack_for_cpu writes, by CPU build (measured with
# ATEN_CPU_CAPABILITY=avx512/avx2/default): blocks of rows, and within a block, for each input, a byte
# per pair of rows: row r with row r + block / 2 ("halves") or row 2j with 2j + 1 ("neighbours").
CPU_INT4_FORMATS = ((64, "halves"), (32, "halves"), (32, "neighbours"))


@functools.cache
def cpu_int4_format() -> tuple[int, str] | None:
    """The (block, pairing) this torch build's CPU int4 kernel reads, found by packing a probe with
    torch's own converter; None: an unknown layout (int4 then decodes through the dequantized GEMM)."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for layout in CPU_INT4_FORMATS:
        if torch.equal(cpu_int4_layout(pack_int4(probe), layout), expected.view(torch.uint8).reshape(128, 32)):
            return layout
    return None


def cpu_int4_layout(packed: torch.Tensor, layout: tuple[int, str]) -> torch.Tensor:
    """Row-major nibbles [out, in / 2] -> torch's CPU kernel layout ``layout`` (block, pairing)."""
    block, pairing = layout
    codes = unpack_int4(packed)
    rows, cols = codes.shape
    blocks = codes.reshape(rows // block, block, cols)
    low, high = (blocks[:, : block // 2], blocks[:, block // 2:]) if pairing == "halves" else \
        (blocks[:, 0::2], blocks[:, 1::2])
    return (low | (high << 4)).permute(0, 2, 1).reshape(rows, cols // 2).contiguous()


def cpu_int4_codes(kernel: torch.Tensor, layout: tuple[int, str]) -> torch.Tensor:
    """The codes [out, in] held in torch's CPU kernel layout ``layout`` (the inverse of the above)."""
    block, pairing = layout
    rows, half = kernel.shape
    pairs = kernel.reshape(rows // block, half * 2, block // 2).permute(0, 2, 1)  # [block, row pair, input]
    low, high = pairs & 15, pairs >> 4
    codes = torch.cat([low, high], dim=1) if pairing == "halves" else torch.stack([low, high], dim=2)
    return codes.reshape(rows, half * 2)


def held_codes(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """int4 codes [out, in] (0..15) from a CPU-held ``qweight`` in ``layout`` ("rows", "lanes", "cpu")."""
    if layout == "lanes":
        return lanes_codes(packed)
    return cpu_int4_codes(packed, cpu_int4_format()) if layout == "cpu" else unpack_int4(packed)


def lanes_layout(packed: torch.Tensor) -> torch.Tensor:
    """Row-major nibbles [out, in / 2] -> the order model/cpu_kernels.py's int4 kernel reads: per 16-row
    block and 8 inputs, 64 bytes, byte 4r + j holding row r's input j (low nibble) and j + 4 (high)."""
    codes = unpack_int4(packed)
    rows, cols = codes.shape
    pieces = codes.reshape(rows // cpu_kernels.LANES, cpu_kernels.LANES, cols // 8, 2, 4)
    joined = pieces[:, :, :, 0] | (pieces[:, :, :, 1] << 4)  # [block, row, 8 inputs, 4]
    return joined.permute(0, 2, 1, 3).reshape(rows, cols // 2).contiguous()


def lanes_codes(kernel: torch.Tensor) -> torch.Tensor:
    """The codes [out, in] held in lanes order (the inverse of ``lanes_layout``)."""
    rows, half = kernel.shape
    pieces = kernel.reshape(rows // cpu_kernels.LANES, half // 4, cpu_kernels.LANES, 4).permute(0, 2, 1, 3)
    return torch.stack([pieces & 15, pieces >> 4], dim=3).reshape(rows, half * 2)


def lanes_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Scales and zeros [out, groups] -> [out / 16, groups, 2, 16] bfloat16, a block's 16 of each together."""
    rows, groups = scales.shape
    both = torch.stack([scales, zeros]).to(torch.bfloat16).reshape(2, rows // cpu_kernels.LANES, cpu_kernels.LANES,
                                                                   groups)
    return both.permute(1, 3, 0, 2).contiguous()


def _bf16_exact(values: torch.Tensor) -> torch.Tensor:
    """Float32 values rounded to the nearest bfloat16 (what the kernels will read)."""
    return values.to(torch.bfloat16).float()


HEAD = QuantConfig("int8")  # the output layer's scheme whatever the decoder's: see docs/quantization.md
FORMAT = "qwen2audio"


def quantize_layers(network: nn.Module, config: QuantConfig, dtype: torch.dtype) -> int:
    """Swap the decoder's linear layers and its untied output layer for quantized ones (on the
    device the network is built on, normally meta, before any weight is read). Returns the count."""
    decoder = network.language_model
    swapped = 0
    for layer in decoder.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _like(child, config, dtype))
                    swapped += 1
    if decoder.lm_head is not None:
        decoder.lm_head = _like(decoder.lm_head, HEAD, dtype)
        swapped += 1
    return swapped


def quantize_network(network: nn.Module, config: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """A loaded float network's decoder quantized in place from its own weights (one layer's float
    weight freed as the next is quantized), ready to run. Loading quantized is the memory-lean way;
    this serves benchmarks that compare both on the same numbers."""
    check_fits(network, config)
    decoder = network.language_model
    parents = [(parent, config) for layer in decoder.model.layers for parent in (layer.self_attn, layer.mlp)]
    for parent, scheme in [*parents, *([(decoder, HEAD)] if decoder.lm_head is not None else [])]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                layer = QuantizedLinear.from_float(child, scheme, dtype)
                layer.prepare()
                setattr(parent, name, layer)
    return network


def _like(linear: nn.Linear, config: QuantConfig, dtype: torch.dtype) -> QuantizedLinear:
    return QuantizedLinear(linear.in_features, linear.out_features, config, linear.bias is not None, dtype,
                           linear.weight.device)


def check_fits(network: nn.Module, config: QuantConfig) -> None:
    """Refuse a group size that does not divide every quantized layer's inputs, naming the layer."""
    if config.scheme != "int4":
        return
    for name, module in network.language_model.model.layers[0].named_modules():
        if isinstance(module, nn.Linear) and module.in_features % config.group_size:
            fitting = [str(g) for g in GROUP_SIZES if module.in_features % g == 0]
            advice = f"a group size of {' or '.join(fitting)}, or int8" if fitting else "int8"
            raise ValueError(f"int4 groups of {config.group_size} do not divide the {module.in_features} inputs of "
                             f"the decoder's {name}: use {advice}")


def saved_config(spec: object) -> QuantConfig | None:
    """The scheme config.json's ``quantization_config`` says the weights are stored in (None: float)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("quant_method") != FORMAT:
        method = spec.get("quant_method") if isinstance(spec, dict) else spec
        raise CheckpointError(f"config.json's quantization_config (quant_method {method!r}) is not a format this "
                              f"package reads: load the original float checkpoint instead")
    try:
        return QuantConfig(spec.get("scheme"), int(spec.get("group_size", 128)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json's quantization_config is not valid: {exc}") from None


def config_entry(config: QuantConfig) -> dict:
    """What ``qwen2audio quantize`` writes into config.json as ``quantization_config``."""
    entry = {"quant_method": FORMAT, "format_version": 1, "scheme": config.scheme,
             "output_layer": HEAD.scheme, "input_scales": True}
    if config.scheme == "int4":
        entry["group_size"] = config.group_size
    return entry


def choose(requested: QuantConfig | None, saved: QuantConfig | None) -> QuantConfig | None:
    """The scheme to load with: a quantized checkpoint loads as saved; asking for another is refused
    (re-quantizing rounded weights would compound both roundings)."""
    if saved is None or requested is None or requested == saved:
        return saved or requested
    raise ValueError(f"this checkpoint is already quantized as {saved.describe()} and cannot be re-quantized as "
                     f"{requested.describe()}: load it without a quantization, or quantize the original weights")


def parse(value: str | QuantConfig | None, group_size: int | None = None) -> QuantConfig | None:
    """``"int8"`` / ``"int4"`` (and a group size) / ``"fp8"`` -> QuantConfig; None stays None."""
    if value is None or isinstance(value, QuantConfig):
        if group_size is not None:
            raise ValueError("a group size needs quantization int4" if value is None else
                             "give the group size inside the QuantConfig, not beside it")
        return value
    if value in ("int8", "fp8") and group_size is not None:
        raise ValueError(f"a group size applies to int4 only ({value} has one scale per output channel)")
    return QuantConfig(value, group_size or 128)  # type: ignore[arg-type]
