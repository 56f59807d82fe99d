"""The decoder's op backend, chosen once when a model is loaded and bound to its layers.

Owns the choice between the eager torch ops (any device) and the Triton kernels of
model/kernels.py (CUDA; the CPU only in Triton's interpreter, for tests), the kernels' self-check
against the eager ops, and the load-time conversion of linear layers (oneDNN on the CPU). Layers
call ``self.ops``; nothing tests a flag per call, and nothing converts a network behind its
owner's back: :func:`prepare_network` is an explicit step of loading.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from qwen2audio import heap
from qwen2audio.config import TextConfig
from qwen2audio.model.attention import AttentionMetadata, KVCache, decode_attention, write_cache
from qwen2audio.model.layers import RMSNorm, RotaryEmbedding, apply_rotary
from qwen2audio.model.quant import QuantizedLinear

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)
Rope = tuple[torch.Tensor, torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]


class EagerOps:
    """The decoder's fusable steps in plain torch: the reference numerics, on any device."""

    kernels = False

    def add_norm(self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor) -> Pair:
        """(norm(residual + hidden), residual + hidden): the residual stream's add, then the norm."""
        summed = residual + hidden
        return norm(summed), summed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2I] (gate first) -> silu(gate) * up [N, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotate_and_store(
        self, qkv: torch.Tensor, rope: Rope, heads: int, kv_heads: int, slots: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [N, (H + 2 KVH) d] -> rotated q [N, H, d], k, v [N, KVH, d]; k and v stored at ``slots``."""
        head_dim = qkv.shape[-1] // (heads + 2 * kv_heads)
        qk, v = qkv.split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=-1)
        qk = apply_rotary(qk.view(-1, heads + kv_heads, head_dim), *rope)  # q and k in one rotation
        q, k, v = qk[:, :heads], qk[:, heads:], v.view(-1, kv_heads, head_dim)
        if cache is not None:
            write_cache(k, v, slots, cache)
        return q, k, v

    def decode_attention(self, query: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return decode_attention(query, cache, meta)


class TritonOps(EagerOps):
    """The same steps as fused Triton kernels (model/kernels.py, imported once here)."""

    kernels = True

    def __init__(self) -> None:
        from qwen2audio.model import kernels

        self.module: ModuleType = kernels

    def add_norm(self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor) -> Pair:
        return self.module.rms_norm(hidden, norm.weight, norm.eps, residual)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.module.silu_mul(gate_up)

    def rotate_and_store(
        self, qkv: torch.Tensor, rope: Rope, heads: int, kv_heads: int, slots: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotates qkv in place and stores the new keys/values in one kernel."""
        self.module.rope_and_cache(qkv, *rope, heads, kv_heads, slots, cache)
        return _split_heads(qkv, heads, kv_heads)

    def decode_attention(self, query: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return self.module.paged_decode_attention(
            query, cache, meta.block_tables[meta.num_prefills:], meta.decode_context_lens)


def _split_heads(qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(-1, heads, head_dim),  # [N, H, d]
            k.view(-1, kv_heads, head_dim),  # [N, KVH, d]
            v.view(-1, kv_heads, head_dim))


EAGER = EagerOps()


@dataclass(frozen=True)
class Backend:
    """What a loaded network computes with: its ops, and whether its linear layers are oneDNN's.

    ``checked`` remembers the KV-cache dtypes the kernels passed their self-check with."""

    ops: EagerOps = EAGER
    onednn: bool = False
    checked: set[torch.dtype] = field(default_factory=set, compare=False)

    @property
    def kernels(self) -> bool:
        return self.ops.kernels

    @property
    def name(self) -> str:
        return ("triton" if self.kernels else "eager") + (" + oneDNN linears" if self.onednn else "")

    def verify_cache(self, config: TextConfig, device: torch.device, dtype: torch.dtype,
                     cache_dtype: torch.dtype) -> None:
        """The kernels must pass their self-check with this KV-cache dtype before an engine uses them."""
        if not self.kernels or cache_dtype in self.checked:
            return
        problem = self_check(config, device, dtype, cache_dtype)
        if problem is not None:
            raise RuntimeError(f"the Triton kernels fail their self-check on {device} with a {cache_dtype} "
                               f"KV cache: {problem}; load the model with kernels=False")
        self.checked.add(cache_dtype)


def kernels_available(device: torch.device) -> bool:
    """Whether model/kernels.py can run on ``device`` (checked without importing triton): CUDA with
    Triton installed, or the CPU in Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def choose_backend(
    config: TextConfig, device: torch.device, dtype: torch.dtype, kernels: bool | None = None,
    onednn: bool = True, cache_dtype: torch.dtype | None = None,
) -> Backend:
    """The Triton kernels if asked (None: on CUDA), see :func:`kernels_backend`; oneDNN linear layers
    for float32 on a CPU whose torch has oneDNN, unless ``onednn`` is False. bfloat16 keeps torch's
    own layers: they are as fast or faster at every row count (bench/RESULTS.md, low-bit kernels)."""
    use_onednn = (onednn and device.type == "cpu" and dtype == torch.float32
                  and torch.backends.mkldnn.is_available())
    wanted = kernels if kernels is not None else device.type == "cuda"
    if not wanted:
        return Backend(EAGER, use_onednn)
    return kernels_backend(config, device, dtype, cache_dtype or dtype, use_onednn, required=kernels is True)


def kernels_backend(config: TextConfig, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype,
                    onednn: bool, required: bool) -> Backend:
    """The Triton kernels where they can run and pass their self-check at the model's sizes; else
    the eager ops, with a warning (an error when ``required``)."""
    if not kernels_available(device):
        if required:
            raise ValueError(f"the Triton kernels cannot run on {device}: install triton (CPU: TRITON_INTERPRET=1)")
        return Backend(EAGER, onednn)
    problem = self_check(config, device, dtype, cache_dtype)
    if problem is None:
        return Backend(TritonOps(), onednn, {cache_dtype})
    if required:
        raise RuntimeError(f"the Triton kernels fail their self-check on {device}: {problem}")
    logger.warning("Triton kernels off (their self-check failed on %s: %s); eager ops and no CUDA graphs",
                   device, problem)
    return Backend(EAGER, onednn)


def prepare_network(network: nn.Module) -> int:
    """The load-time conversion the network's backend asks for, once its weights are in place:
    quantized layers lay their codes out for their kernels, and with ``onednn`` the decoder's
    float linear layers (and the output head) become oneDNN ones.

    MKL's fp32 GEMM is slow for the few rows of a decode step (measured 2-2.6x slower for 1-8 rows
    at these widths) and the same for long prefills; torch's MkldnnLinear keeps the weight in
    oneDNN's blocked layout. Returns how many layers were converted."""
    quantized = [module for module in network.modules() if isinstance(module, QuantizedLinear)]
    for module in quantized:
        module.prepare()
    if quantized:
        heap.release()  # the codes' loading layout, freed as each layer was repacked
    if not network.backend.onednn:
        return 0
    from torch.utils.mkldnn import MkldnnLinear

    decoder = network.language_model
    converted = 0
    for module in [decoder, *decoder.model.layers]:
        for parent in module.modules():
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and (parent is not decoder or name == "lm_head"):
                    setattr(parent, name, MkldnnLinear(child, network.dtype))
                    converted += 1
    logger.info("oneDNN linear layers on the CPU: %d converted", converted)
    return converted


# -- the kernels' self-check --------------------------------------------------------------------


def self_check(config: TextConfig, device: torch.device, dtype: torch.dtype,
               cache_dtype: torch.dtype | None = None) -> str | None:
    """Run every kernel once at the model's sizes against the eager ops; the problem found, or None.
    This compiles most of the variants a run needs early (Triton specialises on argument values
    too, so a few more compile on first use, before any graph capture)."""
    try:
        from qwen2audio.model import kernels

        check = _Check(kernels, config, device, dtype)
        return check.norm_and_mlp() or check.rope_cache_and_decode(cache_dtype or dtype)
    except Exception as exc:  # a kernel that does not compile or launch on this device
        return f"{type(exc).__name__}: {exc}"


class _Check:
    """Random inputs at the model's sizes, and a relative-error comparison."""

    def __init__(self, kernels: ModuleType, config: TextConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.kernels, self.config, self.device, self.dtype = kernels, config, device, dtype
        self.tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        self.generator = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device).to(self.dtype)

    def differs(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        actual, expected = actual.float(), expected.float()
        return not bool(((actual - expected).norm() <= self.tolerance * expected.norm() + 1e-6).item())

    def norm_and_mlp(self) -> str | None:
        hidden = self.config.hidden_size
        x, residual = self.randn(3, hidden), self.randn(3, hidden)
        norm = RMSNorm(hidden, 1e-6).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            norm.weight.copy_(self.randn(hidden))
        if self.differs(self.kernels.rms_norm(x, norm.weight, 1e-6, residual)[0], EAGER.add_norm(norm, x, residual)[0]):
            return "rms_norm differs from the eager RMSNorm"
        gate_up = self.randn(3, 2 * hidden)
        if self.differs(self.kernels.silu_mul(gate_up), EAGER.silu_mul(gate_up)):
            return "silu_mul differs from F.silu(gate) * up"
        return None

    def rope_cache_and_decode(self, cache_dtype: torch.dtype) -> str | None:
        config = self.config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        n, block_size = 20, 16
        qkv = self.randn(n, (heads + 2 * kv_heads) * head_dim)
        rope = RotaryEmbedding(head_dim, 10000.0)(torch.arange(n, device=self.device), self.dtype)
        q_ref = apply_rotary(qkv[:, : heads * head_dim].reshape(n, heads, head_dim), *rope)
        shape = (3, block_size, kv_heads, head_dim)
        cache = (torch.zeros(shape, dtype=cache_dtype, device=self.device),
                 torch.zeros(shape, dtype=cache_dtype, device=self.device))
        self.kernels.rope_and_cache(qkv, *rope, heads, kv_heads, torch.arange(n, device=self.device), cache)
        if self.differs(qkv[:, : heads * head_dim].reshape(n, heads, head_dim), q_ref):
            return "rope_and_cache differs from apply_rotary"
        query = self.randn(1, heads, head_dim)
        keys = cache[0].view(-1, kv_heads, head_dim)[:n].transpose(0, 1).to(self.dtype)  # [KVH, n, d]
        values = cache[1].view(-1, kv_heads, head_dim)[:n].transpose(0, 1).to(self.dtype)
        expected = F.scaled_dot_product_attention(query[0][:, None, :], keys, values,
                                                  enable_gqa=heads != kv_heads)[:, 0, :]
        tables = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=self.device)
        lens = torch.tensor([n], dtype=torch.int32, device=self.device)
        if self.differs(self.kernels.paged_decode_attention(query, cache, tables, lens)[0], expected):
            return "paged_decode_attention differs from scaled_dot_product_attention"
        return None
