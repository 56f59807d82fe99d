"""``qwen2audio quantize``: write a checkpoint whose decoder is stored as int8/int4 codes.

Owns the saved layout (docs/quantization.md): the model's own tensor names (fused ``qkv_proj`` and
``gate_up_proj``), each quantized layer as ``qweight`` / ``scales`` / ``zeros`` / ``input_scale``
beside its float ``bias``, everything else in the source checkpoint's dtype, and
``quantization_config`` in config.json. Loading it reads the codes as stored: nothing is
re-quantized. The source is quantized while it loads (see model/weights.py), so this needs the
memory of the quantized model, not of the float one.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qwen2audio.api import Qwen2Audio, parse_quantization
from qwen2audio.errors import CheckpointError, InputError
from qwen2audio.hub import resolve_checkpoint
from qwen2audio.model import quant
from qwen2audio.model.weights import checkpoint_files, read_header

logger = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


def quantize_checkpoint(source: str, output: str | pathlib.Path, scheme: str, group_size: int | None = None,
                        progress: bool = True) -> pathlib.Path:
    """Quantize ``source`` (directory or hub id) into the new directory ``output``; returns it."""
    config = parse_quantization(scheme, group_size)
    target = pathlib.Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"--output {target}: exists and is not an empty directory")
    directory = resolve_checkpoint(source)
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    saved = quant.saved_config(raw.get("quantization_config"))
    if saved is not None:
        raise InputError(f"{source} is already quantized ({saved.describe()}): quantize the original weights")
    dtype = _stored_dtype(directory)
    model = Qwen2Audio.from_pretrained(directory, device="cpu", dtype=dtype, progress=progress, quantization=config)
    target.mkdir(parents=True, exist_ok=True)
    _write_weights(model.network, target, progress)
    raw["quantization_config"] = quant.config_entry(config)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (target / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    for path in directory.iterdir():
        if path.is_file() and path.name != "config.json" and not any(path.match(p) for p in _WEIGHT_FILES):
            shutil.copy(path, target / path.name)
    logger.info("wrote %s (%s)", target, config.describe())
    return target


def _stored_dtype(directory: pathlib.Path) -> torch.dtype:
    """The floating dtype the source stores its weights in: the unquantized tensors keep it."""
    for path in checkpoint_files(directory):
        for entry in read_header(path).values():
            if entry.dtype in (torch.float32, torch.bfloat16, torch.float16):
                return entry.dtype
    raise CheckpointError(f"{directory}: no floating-point tensors")


def saved_tensors(network: torch.nn.Module) -> dict[str, tuple[int, Callable[[], torch.Tensor]]]:
    """Every tensor to write, by name: its size, and a function giving it in the saved layout (int4
    codes held in a kernel's layout are converted back one layer at a time, as their shard is
    written; every layout has the saved one's size)."""
    tensors = {name: (_nbytes(param), param.detach) for name, param in network.named_parameters()}
    for name, module in network.named_modules():
        if isinstance(module, quant.QuantizedLinear):
            for key, buffer in module.named_buffers(recurse=False):
                getter = module.saved_qweight if key == "qweight" else buffer.detach
                tensors[f"{name}.{key}"] = (_nbytes(buffer), getter)
    return tensors


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_weights(network: torch.nn.Module, target: pathlib.Path, progress: bool) -> None:
    tensors = saved_tensors(network)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (nbytes, _) in tensors.items():
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name][1]().contiguous() for name in names}, target / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(nbytes for nbytes, _ in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
