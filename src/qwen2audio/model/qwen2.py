"""The Qwen2 decoder over a flattened batch: embeddings in, hidden states out.

Owns attention/MLP blocks with fused qkv and gate/up matrices (the one rename at load time, see
weights.py); takes positions, per-step attention metadata and KV cache views as arguments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qwen2audio.config import TextConfig
from qwen2audio.model.attention import AttentionMetadata, KVCache, attention
from qwen2audio.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, embedding


class Qwen2Attention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """hidden [N, hidden] -> [N, hidden]."""
        qkv = self.qkv_proj(hidden)  # [N, q_size + 2 * kv_size]
        if meta.use_kernels:  # rotate in place and store the new keys/values in one kernel
            from qwen2audio.model import kernels

            kernels.rope_and_cache(qkv, *rope, self.heads, self.kv_heads, meta.slot_mapping, cache)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.heads, self.head_dim)  # [N, heads, d]
        k = k.view(-1, self.kv_heads, self.head_dim)  # [N, kv_heads, d]
        v = v.view(-1, self.kv_heads, self.head_dim)
        if not meta.use_kernels:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attention(q, k, v, meta, cache, cache_written=meta.use_kernels)  # [N, heads, d]
        return self.o_proj(out.reshape(-1, self.q_size))


class Qwen2MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)  # [N, 2 * intermediate]
        if fused:
            from qwen2audio.model import kernels

            return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried beside the block's output, so that each add fuses with the
        norm after it: (previous block's output, stream so far) -> (this block's output, stream)."""
        fused = meta.use_kernels
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_norm(hidden, residual, fused)
        hidden = self.self_attn(hidden, rope, meta, cache)
        hidden, residual = self.post_attention_layernorm.add_norm(hidden, residual, fused)
        return self.mlp(hidden, fused), residual


class Qwen2Model(nn.Module):
    """Embedding table, decoder blocks and the final norm (``language_model.model`` in checkpoints)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """embeds [N, hidden], positions [N] -> final hidden states [N, hidden]."""
        rope = self.rotary_emb(positions, embeds.dtype)
        hidden, residual = embeds, None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, rope, meta, caches[index] if caches is not None else None)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_norm(hidden, residual, meta.use_kernels)[0]


class Qwen2ForCausalLM(nn.Module):
    """Decoder plus the output head; with tied embeddings the head reuses the embedding matrix."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
