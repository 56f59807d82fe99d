"""LoRA adapters in PEFT's format, served from one copy of the base weights, several in one batch.

Owns reading and checking an adapter directory, the low-rank buffers of every adapter slot, and
the batched product. Each LoRA-capable linear layer (decoder, output layer, audio encoder,
projector) gets two buffers: A [in, C] and B [C, out], whose C = max_loras x parts x max_rank
columns hold every slot's factors side by side (parts: q/k/v or gate/up, kept fused in one of our
layers). A step's rows pick their own slot's columns with a mask: a batch that mixes adapters and
the base model costs two small GEMMs a layer, with fixed shapes (CUDA graphs replay it), no gather
and no host synchronisation. The scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into
B. Slot 0 is "no adapter"; a step without adapter rows passes no rows and skips all of it.

The layers themselves are untouched: a forward hook adds the low-rank product to their output, so
checkpoints, quantized layers and the backend's kernels see the same modules as without LoRA.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pathlib
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.mkldnn import MkldnnLinear

from qwen2audio.errors import AdapterError, AdapterNotFoundError
from qwen2audio.model.quant import QuantizedLinear
from qwen2audio.model.weights import canonical_name, fused_destination

logger = logging.getLogger(__name__)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json fields that change what the adapter computes in ways this engine does not.
REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (whole layers trained beside the adapter)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_bias": "lora_bias",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class Target:
    """A linear layer of our network that adapters can change, and the output rows of each part
    (q, k, v or gate, up) that PEFT's separate layers map to."""

    name: str
    module: nn.Module
    kind: str  # "decoder", "head", "encoder" or "projector": which rows of a step it sees
    in_features: int
    out_features: int
    parts: tuple[tuple[int, int], ...]


@dataclass
class Adapter:
    """An adapter read from disk: per target, (part, A [r, in], B [rows, r] times the scaling)."""

    path: str
    rank: int
    factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
    audio: bool  # it changes the audio encoder or the projector, so the encoder's output too


@dataclass
class Loaded:
    """An adapter in a slot. ``key`` differs for every load, so caches never mix two loads of a name."""

    name: str
    path: str
    slot: int
    key: str
    audio: bool
    users: int = 0
    unloaded: bool = False


def lora_targets(network: nn.Module) -> dict[str, Target]:
    """Every linear layer of the network, by module name (the checkpoint's layout)."""
    text = network.config.text
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    targets = {}
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear | QuantizedLinear | MkldnnLinear):
            continue
        out_features, in_features = _dims(module)
        if name.endswith("qkv_proj"):
            parts: tuple[tuple[int, int], ...] = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
        elif name.endswith("gate_up_proj"):
            parts = ((0, out_features // 2), (out_features // 2, out_features))
        else:
            parts = ((0, out_features),)
        targets[name] = Target(name, module, _kind(name), in_features, out_features, parts)
    return targets


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, QuantizedLinear):
        return module.out_features, module.in_features
    return tuple(module.weight.shape)  # MkldnnLinear keeps no in/out attributes


def _kind(name: str) -> str:
    if name == "language_model.lm_head":
        return "head"
    return {"audio_tower": "encoder", "multi_modal_projector": "projector"}.get(name.split(".")[0], "decoder")


def read_config(directory: pathlib.Path) -> dict:
    """adapter_config.json, refusing what this engine cannot compute."""
    if not (directory / CONFIG).is_file():
        raise AdapterError(f"{directory}: no {CONFIG} (a PEFT LoRA adapter directory has {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{directory}: {CONFIG} cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{directory}: {CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory}: a {config['peft_type']} adapter; only LoRA adapters are supported")
    refused = [what for key, what in REFUSED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"trained biases (bias={config['bias']!r})")
    if refused:
        raise AdapterError(f"{directory}: {', '.join(refused)} is not supported; plain LoRA (and rsLoRA) is")
    return config


def adapter_rank(path: str | pathlib.Path) -> int:
    """The largest rank an adapter's config declares (to size slots for it before reading it)."""
    config = read_config(_local(path))
    try:
        return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    except (TypeError, ValueError, AttributeError) as exc:
        raise AdapterError(f"{path}: r/rank_pattern in {CONFIG} are not ranks ({exc})") from None


def read_adapter(path: str | pathlib.Path, targets: dict[str, Target], max_rank: int, network: nn.Module
                 ) -> Adapter:
    """Read and check an adapter against the network's layers; factors stay on the host in float32."""
    directory = _local(path)
    config = read_config(directory)
    if not (directory / WEIGHTS).is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS} (adapters saved as .bin are not read: resave with "
                           f"safe_serialization=True)")
    try:
        tensors = load_file(directory / WEIGHTS)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise AdapterError(f"{directory}: {WEIGHTS} cannot be read ({exc})") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{directory}: unexpected tensor {key!r} (embedding LoRA, DoRA magnitudes and "
                               f"saved modules are not supported)")
        grouped.setdefault(match["module"], {})[match["factor"]] = tensor
    factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for module, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{directory}: {module} has lora_{next(iter(pair))} without its other factor")
        target, part = _target_of(module, targets, network, directory)
        a, b = pair["A"].float(), pair["B"].float()
        _check_shapes(module, target, part, a, b, directory)
        _check_rank(module, a.shape[0], max_rank, directory)
        b = b * _scale(config, module, a.shape[0], directory)
        if not (torch.isfinite(a.to(network.dtype)).all() and torch.isfinite(b.to(network.dtype)).all()):
            # one NaN in a slot would reach every row of a batch (0 * NaN): refused, not served
            raise AdapterError(f"{directory}: {module} holds values that are not finite in {network.dtype}")
        factors.setdefault(target.name, []).append((part, a, b))
    if not factors:
        raise AdapterError(f"{directory}: {WEIGHTS} holds no LoRA factors")
    audio = any(targets[t].kind in ("encoder", "projector") for t in factors)
    rank = max(a.shape[0] for parts in factors.values() for _, a, _ in parts)
    return Adapter(str(path), rank, factors, audio)


def _check_rank(module: str, rank: int, max_rank: int, directory: pathlib.Path) -> None:
    if rank < 1:
        raise AdapterError(f"{directory}: {module} has rank {rank}")
    if rank > max_rank:
        raise AdapterError(f"{directory}: rank {rank} at {module} is over this engine's max_lora_rank {max_rank} "
                           f"(serve with --max-lora-rank {rank} or more)")


def _scale(config: dict, module: str, rank: int, directory: pathlib.Path) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (alpha from alpha_pattern if it matches)."""
    try:
        alpha = float(_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    except (re.error, TypeError, ValueError) as exc:
        raise AdapterError(f"{directory}: lora_alpha/alpha_pattern cannot be used ({exc})") from None
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _local(path: str | pathlib.Path) -> pathlib.Path:
    """The adapter's directory (front ends resolve hub ids first: hub.resolve_adapter)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    return directory


def _target_of(module: str, targets: dict[str, Target], network: nn.Module, directory: pathlib.Path
               ) -> tuple[Target, int]:
    """Our layer and part for a PEFT module name (either transformers layout; q/k/v and gate/up fused)."""
    destination, part, parts = fused_destination(canonical_name(f"{module}.weight"))
    ours = destination.removesuffix(".weight")
    target = targets.get(ours)
    if target is None or len(target.parts) != parts:
        try:
            kind = type(network.get_submodule(ours)).__name__
        except AttributeError:
            kind = None
        what = f"not a linear layer but {kind}" if kind else "no such layer in this model (an adapter for another one?)"
        raise AdapterError(f"{directory}: unknown target module {module!r}: {what}")
    return target, part


def _check_shapes(module: str, target: Target, part: int, a: torch.Tensor, b: torch.Tensor,
                  directory: pathlib.Path) -> None:
    start, stop = target.parts[part]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != target.in_features or b.shape != (stop - start, a.shape[0]):
        raise AdapterError(
            f"{directory}: shape mismatch at {module}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} against a "
            f"base layer of {target.in_features} inputs and {stop - start} outputs (an adapter for another base "
            f"model?)")


def _pattern(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


Groups = list[tuple[int, torch.Tensor]]  # (slot, the indices of its rows), slot 0 left out


def grouped(slots: np.ndarray, device: torch.device) -> Groups:
    """Each adapter slot's rows, from slots the host knows (one per row)."""
    return [(int(slot), torch.from_numpy(np.flatnonzero(slots == slot)).to(device))
            for slot in np.unique(slots) if slot]


class LoraContext:
    """Which slot each row of the current forward uses, by kind of row; empty outside a step.

    Two forms, chosen by measurement (bench/lora_cpu.py): slot rows on the device (the masked wide
    product: fixed shapes, what decode steps and their graphs use; 2-3x faster than the others at
    8 rows), or host-made groups (one product per adapter over its rows: a prefill's thousand rows
    do a quarter of the masked product's work)."""

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}
        self.groups: dict[str, Groups] = {}
        self.every_layer = False
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    @contextmanager
    def using(self, every_layer: bool = False, groups: dict[str, Groups] | None = None,
              **rows: torch.Tensor | None) -> Iterator[None]:
        """Rows by kind (decoder [N], head [S], encoder [W] windows, projector [A]), as slot tensors
        or as ``groups``. ``every_layer``: also layers no adapter changes yet (a captured graph must
        hold every layer's product)."""
        self.rows = {kind: value for kind, value in rows.items() if value is not None}
        self.groups, self.every_layer, self._masks = groups or {}, every_layer, {}
        try:
            yield
        finally:
            self.rows, self.groups, self.every_layer, self._masks = {}, {}, False, {}

    def mask(self, kind: str, columns: torch.Tensor) -> torch.Tensor:
        """[rows, C]: True where a column belongs to the row's slot (made once per step and width)."""
        key = (kind, columns.shape[0])
        if key not in self._masks:
            self._masks[key] = self.rows[kind][:, None] == columns
        return self._masks[key]


class LoraLayer:
    """One target's buffers for every slot; its hook adds ``((x @ A) * mask) @ B`` to the output."""

    def __init__(self, target: Target, context: LoraContext, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.target, self.context, self.kind = target, context, target.kind
        self.width, self.max_rank = len(target.parts) * max_rank, max_rank
        columns = max_loras * self.width
        self.a = torch.zeros(target.in_features, columns, dtype=dtype, device=device)
        self.b = torch.zeros(columns, target.out_features, dtype=dtype, device=device)
        self.columns = torch.arange(columns, device=device) // self.width + 1  # each column's slot
        self.live: set[int] = set()  # slots whose adapter changes this layer
        self.handle = target.module.register_forward_hook(_weak_hook(self))

    def __del__(self) -> None:
        self.handle.remove()

    def write(self, slot: int, factors: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter's factors in ``slot``'s columns (none: clear them)."""
        first = (slot - 1) * self.width
        self.a[:, first:first + self.width].zero_()
        self.b[first:first + self.width].zero_()
        for part, a, b in factors:
            start, (row, stop) = first + part * self.max_rank, self.target.parts[part]
            self.a[:, start:start + a.shape[0]] = a.T.to(self.a)
            self.b[start:start + a.shape[0], row:stop] = b.T.to(self.b)
        (self.live.add if factors else self.live.discard)(slot)

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        groups = self.context.groups.get(self.kind)
        if groups is not None:
            return self._grouped(x, output, groups)
        rows = self.context.rows.get(self.kind)
        if rows is None or not (self.live or self.context.every_layer):
            return None
        low = x.to(self.a.dtype) @ self.a  # [..., C]
        mask = self.context.mask(self.kind, self.columns)
        if low.dim() == 3:  # encoder windows [W, S, C]: one slot per window
            mask = mask[:, None, :]
        # where, not a product: another slot's column that overflowed must give 0, not inf * 0
        return output + (torch.where(mask, low, 0) @ self.b).to(output.dtype)

    def _grouped(self, x: torch.Tensor, output: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Each adapter's product over its own rows (windows, for the encoder), added in place."""
        for slot, index in groups:
            if slot in self.live:
                columns = slice((slot - 1) * self.width, slot * self.width)
                low = x.index_select(0, index).to(self.a.dtype) @ self.a[:, columns]
                output.index_add_(0, index, (low @ self.b[columns]).to(output.dtype))
        return output


def _weak_hook(layer: LoraLayer) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """A hook that does not keep its layer alive: dropping an engine drops its adapters' buffers."""
    ref = weakref.ref(layer)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        live = ref()
        return None if live is None else live(args[0], output)

    return hook


@dataclass
class LoraManager:
    """The slots of one engine: which adapter is where, who uses it, loading and unloading.

    Thread-safe: a server loads adapters from its event loop while the engine steps elsewhere. An
    unloaded adapter leaves its slot when its last request finishes, so a request never sees
    another adapter's weights mid-reply."""

    network: nn.Module
    max_loras: int
    max_rank: int
    context: LoraContext = field(default_factory=LoraContext)

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be at least 1")
        self.targets = lora_targets(self.network)
        device, dtype = self.network.device, self.network.dtype
        self.layers = {name: LoraLayer(target, self.context, self.max_loras, self.max_rank, dtype, device)
                       for name, target in self.targets.items()}
        self.slots: list[Loaded | None] = [None] * (self.max_loras + 1)  # slot 0: the base model
        self.loaded: dict[str, Loaded] = {}
        self._lock = threading.Lock()
        self._loads = itertools.count(1)
        megabytes = sum(layer.a.nbytes + layer.b.nbytes for layer in self.layers.values()) / 2**20
        logger.info("LoRA: %d slots of rank up to %d over %d layers (%.0f MiB)", self.max_loras, self.max_rank,
                    len(self.layers), megabytes)

    def load(self, path: str | pathlib.Path, name: str) -> Loaded:
        """Read an adapter and put it in a free slot under ``name``."""
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        adapter = read_adapter(path, self.targets, self.max_rank, self.network)  # the slow part: no lock
        with self._lock:
            if name in self.loaded:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
            slot = next((s for s in range(1, len(self.slots)) if self.slots[s] is None), None)
            if slot is None:
                raise AdapterError(f"all {self.max_loras} adapter slots are in use (max_loras): unload one first")
            for target, layer in self.layers.items():
                layer.write(slot, adapter.factors.get(target, []))
            loaded = Loaded(name, adapter.path, slot, f"{name}#{next(self._loads)}", adapter.audio)
            self.slots[slot] = self.loaded[name] = loaded
        logger.info("LoRA adapter %r (rank %d, %d layers%s) in slot %d", name, adapter.rank, len(adapter.factors),
                    ", audio side too" if adapter.audio else "", slot)
        return loaded

    def unload(self, name: str) -> None:
        with self._lock:
            loaded = self.find(name)
            del self.loaded[name]
            loaded.unloaded = True
            if not loaded.users:
                self._free(loaded)

    def acquire(self, name: str) -> Loaded:
        """The adapter a new request uses, held until :meth:`release`."""
        with self._lock:
            loaded = self.find(name)
            loaded.users += 1
            return loaded

    def find(self, name: str) -> Loaded:
        loaded = self.loaded.get(name)
        if loaded is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
        return loaded

    def release(self, loaded: Loaded) -> None:
        with self._lock:
            loaded.users -= 1
            if loaded.unloaded and not loaded.users:
                self._free(loaded)

    def _free(self, loaded: Loaded) -> None:
        for layer in self.layers.values():
            if loaded.slot in layer.live:
                layer.write(loaded.slot, [])
        self.slots[loaded.slot] = None
