"""Strict checkpoint loading: safetensors files -> parameters of a model built on the meta device.

Owns the one table of name changes (both key layouts, fused qkv and gate/up) and the checks that
fail loudly on anything missing, unexpected, mis-shaped or truncated. Tensors are read with plain
positioned reads straight into their destination (one tensor of scratch when the dtype or device
differs) instead of memory-mapping whole files, so the resident set stays near one copy of the
weights: a mapping keeps every page it touched resident until the file is closed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qwen2audio import heap
from qwen2audio.errors import CheckpointError
from qwen2audio.model.quant import QuantizedLinear

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
_MAX_HEADER = 100 * 1024 * 1024
_READERS = min(4, os.cpu_count() or 1)
_PIECE_BYTES = 16 * 2**20  # a quantized layer's float rows are read this much at a time
_EMBEDDING = "language_model.model.embed_tokens.weight"  # mapped from the file where it can be (_map_into)

# Newer transformers keep other names in memory; checkpoints may carry any of these layouts
# (transformers 5.15 writes the decoder as "language_model.model.model.*").
_LAYOUT = [
    (re.compile(r"^language_model\.model\.model\."), "language_model.model."),
    (re.compile(r"^model\.audio_tower\."), "audio_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]
# Separate checkpoint matrices that the model keeps fused: (pattern, fused name, part index, parts).
_DECODER_LAYER = r"^(language_model\.model\.layers\.\d+\."
_FUSED = [
    (re.compile(_DECODER_LAYER + r"self_attn)\.(q|k|v)_proj\.(weight|bias)$"), "qkv_proj", ["q", "k", "v"]),
    (re.compile(_DECODER_LAYER + r"mlp)\.(gate|up)_proj\.(weight)$"), "gate_up_proj", ["gate", "up"]),
]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, dtype, shape, byte range."""

    path: pathlib.Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def checkpoint_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json (all must exist)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from None
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: missing shard file(s) {', '.join(missing)} named in {index.name}")
        return [directory / name for name in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_header(path: pathlib.Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    base = 8 + header_len
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {spec.get('dtype')}")
        start, end = spec["data_offsets"]
        entry = TensorEntry(path, _DTYPES[spec["dtype"]], tuple(spec["shape"]), base + start, base + end)
        expected = _numel(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()
        if entry.nbytes != expected:
            raise CheckpointError(f"{path}: tensor {name} has {entry.nbytes} bytes for shape {entry.shape}")
        if entry.end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, tensor {name} ends at {entry.end})"
            )
        entries[name] = entry
    return entries


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def canonical_name(name: str) -> str:
    """A checkpoint key in the saved (legacy) layout."""
    for pattern, replacement in _LAYOUT:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def fused_destination(name: str) -> tuple[str, int, int]:
    """(parameter name, part index, number of parts) for a canonical checkpoint key."""
    for pattern, fused, parts in _FUSED:
        match = pattern.match(name)
        if match:
            prefix, part, kind = match.groups()
            return f"{prefix}.{fused}.{kind}", parts.index(part), len(parts)
    return name, 0, 1


def load_weights(model: nn.Module, directory: pathlib.Path, progress: bool = True) -> None:
    """Fill every parameter of ``model`` (allocated, uninitialised) from the checkpoint in ``directory``."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(directory):
        for name, entry in read_header(path).items():
            entries[canonical_name(name)] = entry
    params = _targets(model, entries)
    tied = getattr(model.config, "tie_word_embeddings", False)
    plan = _plan(params, entries, tied=tied)
    if not tied:
        plan = [item for item in plan if not (item[0] == _EMBEDDING and _map_into(params[_EMBEDDING], item[2]))]
    total = sum(entry.nbytes for _, _, entry in plan)
    scratch = _Scratch()
    ordered = list(_ordered(plan))
    quantizing: dict[QuantizedLinear, list[tuple[int, TensorEntry]]] = {}
    for target, entry in ordered:
        if isinstance(target, _Quantizing):
            quantizing.setdefault(target.layer, []).append((target.start, entry))
    ordered = [(t, e) for t, e in ordered if not isinstance(t, _Quantizing)]
    direct = [(t, e) for t, e in ordered if _is_direct(t, e)]
    converted = [(t, e) for t, e in ordered if not _is_direct(t, e)]
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=_READERS) as pool:
        # Reads straight into place need no scratch, so they run in parallel: faulting in fresh
        # pages and copying from the page cache are the cost, and both scale with cores.
        for entry in pool.map(lambda item: _read_into(*item, scratch=None), direct):
            bar.update(entry.nbytes)
        for target, entry in converted:
            _read_into(target, entry, scratch)
            bar.update(entry.nbytes)
        for layer, parts in quantizing.items():
            layer.quantize_from(lambda parts=parts: _row_pieces(parts, scratch))
            bar.update(sum(entry.nbytes for _, entry in parts))
            heap.release()  # quantizing frees many mid-sized temporaries
    heap.release()


def _map_into(param: torch.Tensor, entry: TensorEntry) -> bool:
    """Point a CPU parameter at its bytes in the checkpoint file (a private, read-only-in-practice
    mapping) instead of reading them, where the dtype already matches. Used for the embedding
    table: a lookup touches only the rows of the tokens seen, so only those pages become resident
    (1.3 GB of the 7B's bf16 table otherwise held for a few rows). False: read it as usual."""
    itemsize = entry.dtype.itemsize
    if param.device.type != "cpu" or param.dtype != entry.dtype or entry.start % itemsize:
        return False
    storage = torch.UntypedStorage.from_file(str(entry.path), shared=False, nbytes=entry.path.stat().st_size)
    param.data = torch.empty(0, dtype=entry.dtype).set_(storage, entry.start // itemsize, entry.shape)
    return True


def _row_pieces(parts: list[tuple[int, TensorEntry]], scratch: _Scratch) -> Iterator[tuple[int, torch.Tensor]]:
    """The rows of a quantized layer's float weight, read from its checkpoint tensors a slice at a
    time into the scratch buffer (each slice is used before the next is read)."""
    for start, entry in parts:
        width = _numel(entry.shape[1:])
        row_bytes = width * entry.dtype.itemsize
        step = max(1, _PIECE_BYTES // row_bytes)
        for first in range(0, entry.shape[0], step):
            count = min(step, entry.shape[0] - first)
            piece = TensorEntry(entry.path, entry.dtype, (count, width), entry.start + first * row_bytes,
                                entry.start + (first + count) * row_bytes)
            buffer = scratch.get(piece, pin=False)
            _read_bytes(piece, buffer)
            yield start + first, buffer


def _targets(model: nn.Module, entries: dict[str, TensorEntry]) -> dict[str, object]:
    """Every tensor the checkpoint must fill, by name: the parameters, and for each quantized layer
    either its stored codes (a quantized checkpoint) or its float weight, quantized as it is read."""
    targets: dict[str, object] = dict(model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            if f"{name}.qweight" in entries:
                targets.update({f"{name}.{key}": buffer for key, buffer in module.named_buffers(recurse=False)})
            else:
                targets[f"{name}.weight"] = _Quantizing(module)
    return targets


class _Quantizing:
    """Stands in for a quantized layer's float weight (or rows of it) in the plan, which checks its
    shape; load_weights then streams those rows to the layer (QuantizedLinear.quantize_from)."""

    dtype = torch.float32

    def __init__(self, layer: QuantizedLinear, start: int = 0, rows: int | None = None) -> None:
        self.layer, self.start = layer, start
        self.shape = torch.Size((layer.out_features if rows is None else rows, layer.in_features))
        self.device = layer.qweight.device

    @property
    def data(self) -> _Quantizing:
        return self

    def __getitem__(self, rows: slice) -> _Quantizing:
        start, stop, _ = rows.indices(self.shape[0])
        return _Quantizing(self.layer, self.start + start, stop - start)

    def is_contiguous(self) -> bool:
        return False


def parameter_views(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """For checkpoint tensor names (any accepted layout) and shapes, the slices of ``model``'s
    parameters they would fill (a q_proj is rows of the fused qkv_proj): another implementation can
    then run on this model's weights, as the GPU benchmark runs transformers. Same checks as loading."""
    canonical = {canonical_name(name): name for name in shapes}
    entries = {canon: TensorEntry(pathlib.Path(name), torch.float32, tuple(shapes[name]), 0, 0)
               for canon, name in canonical.items()}
    plan = _plan(dict(model.named_parameters()), entries, tied=getattr(model.config, "tie_word_embeddings", False))
    return {canonical[name]: target for name, target, _ in plan}


def _plan(
    params: dict[str, nn.Parameter | _Quantizing], entries: dict[str, TensorEntry], tied: bool
) -> list[tuple[str, torch.Tensor, TensorEntry]]:
    """Match checkpoint tensors to parameter slices; report every problem at once."""
    groups: dict[str, list[tuple[int, int, str, TensorEntry]]] = {}
    unexpected = []
    for name, entry in entries.items():
        param_name, part, parts = fused_destination(name)
        if param_name not in params:
            if not (tied and name == "language_model.lm_head.weight"):
                unexpected.append(name)
            continue
        groups.setdefault(param_name, []).append((part, parts, name, entry))
    plan, missing, misshaped = [], [], []
    for param_name, param in params.items():
        found = sorted(groups.get(param_name, []), key=lambda item: item[0])
        if not found or len(found) != found[0][1]:
            missing.append(param_name)
            continue
        if len(found) == 1:
            if tuple(param.shape) != found[0][3].shape:
                misshaped.append(f"{found[0][2]}: checkpoint {list(found[0][3].shape)}, model {list(param.shape)}")
            else:
                plan.append((found[0][2], param.data, found[0][3]))
            continue
        # Fused parameter: the parts stack along dim 0 and must fill it exactly.
        rows = sum(entry.shape[0] for *_, entry in found)
        if rows != param.shape[0] or any(entry.shape[1:] != tuple(param.shape[1:]) for *_, entry in found):
            parts = " + ".join(f"{name} {list(entry.shape)}" for _, _, name, entry in found)
            misshaped.append(f"{parts}: checkpoint, model expects {list(param.shape)} in total ({param_name})")
            continue
        row = 0
        for _part, _parts, name, entry in found:
            plan.append((name, param.data[row:row + entry.shape[0]], entry))
            row += entry.shape[0]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_shorten(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_shorten(unexpected))}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(_shorten(misshaped))}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config: " + " | ".join(problems))
    return plan


def _shorten(items: list[str], limit: int = 12) -> list[str]:
    return items if len(items) <= limit else [*items[:limit], f"... and {len(items) - limit} more"]


def _ordered(plan: list[tuple[str, torch.Tensor, TensorEntry]]) -> Iterator[tuple[torch.Tensor, TensorEntry]]:
    """File order, so reads stream through each shard front to back."""
    for _name, target, entry in sorted(plan, key=lambda item: (str(item[2].path), item[2].start)):
        yield target, entry


class _Scratch:
    """One reusable host buffer for tensors that need a dtype change or a copy to the GPU: reusing
    it avoids faulting in fresh pages for every tensor, and it is pinned when a GPU is the target."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, entry: TensorEntry, pin: bool) -> torch.Tensor:
        if self._buffer.numel() < entry.nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buffer = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._buffer[: entry.nbytes].view(entry.dtype).view(entry.shape)


def _is_direct(target: torch.Tensor, entry: TensorEntry) -> bool:
    return target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous()


def _read_into(target: torch.Tensor, entry: TensorEntry, scratch: _Scratch | None) -> TensorEntry:
    direct = _is_direct(target, entry)
    buffer = target if direct else scratch.get(entry, pin=target.device.type == "cuda")
    _read_bytes(entry, buffer)
    if not direct:
        target.copy_(buffer)
    return entry


def _read_bytes(entry: TensorEntry, buffer: torch.Tensor) -> None:
    """The entry's bytes from its file into ``buffer`` (a CPU tensor of exactly that size)."""
    view = memoryview(buffer.view(torch.uint8).numpy()).cast("B") if buffer.numel() else memoryview(b"")
    with open(entry.path, "rb", buffering=0) as handle:
        handle.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            count = handle.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{entry.path}: truncated while reading (expected {entry.nbytes} bytes)")
            done += count
