"""The Qwen2 decoder over a flattened batch: embeddings in, hidden states out.

Owns attention/MLP blocks with fused qkv and gate/up matrices (the one rename at load time, see
weights.py); takes positions, per-step attention metadata and KV cache views as arguments. The
fusable steps (norm after residual add, rotary + cache write, SiLU*up, decode attention) go
through the ops of the backend the decoder was built with (model/backend.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qwen2audio.config import TextConfig
from qwen2audio.model.attention import AttentionMetadata, KVCache, attention
from qwen2audio.model.backend import EAGER, EagerOps
from qwen2audio.model.layers import RMSNorm, RotaryEmbedding, embedding


class Qwen2Attention(nn.Module):
    def __init__(self, config: TextConfig, ops: EagerOps = EAGER) -> None:
        super().__init__()
        self.ops = ops
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
        q, k, v = self.ops.rotate_and_store(qkv, rope, self.heads, self.kv_heads, meta.slot_mapping, cache)
        out = attention(q, k, v, meta, cache, self.ops.decode_attention)  # [N, heads, d]
        return self.o_proj(out.reshape(-1, self.q_size))


class Qwen2MLP(nn.Module):
    def __init__(self, config: TextConfig, ops: EagerOps = EAGER) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)  # [N, 2 * intermediate]
        return self.down_proj(self.ops.silu_mul(gate_up))  # [N, hidden]


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, ops: EagerOps = EAGER) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config, ops)

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
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.ops.add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(hidden, rope, meta, cache)
        hidden, residual = self.ops.add_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden), residual


class Qwen2Model(nn.Module):
    """Embedding table, decoder blocks and the final norm (``language_model.model`` in checkpoints)."""

    def __init__(self, config: TextConfig, ops: EagerOps = EAGER) -> None:
        super().__init__()
        self.ops = ops
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, ops) for _ in range(config.num_hidden_layers))
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
        return self.ops.add_norm(self.norm, hidden, residual)[0]


class Qwen2ForCausalLM(nn.Module):
    """Decoder plus the output head; with tied embeddings the head reuses the embedding matrix."""

    def __init__(self, config: TextConfig, ops: EagerOps = EAGER) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, ops)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
