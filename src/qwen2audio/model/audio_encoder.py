"""The Whisper-style audio encoder and the projector into the decoder's embedding space.

Owns conv stem, encoder blocks, pooling and projection over 30 s windows; module names follow the
checkpoint (``audio_tower.layers.N.self_attn.q_proj``). It must not know about prompts or tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qwen2audio.config import AudioEncoderConfig
from qwen2audio.model.layers import embedding


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention; k_proj has no bias in the checkpoint."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        dim = config.d_model
        self.heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden [W, S, dim], key_mask [W, 1, 1, S] (True = attend; None = all) -> [W, S, dim]."""
        windows, length, dim = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(windows, length, self.heads, self.head_dim).transpose(1, 2)  # [W, heads, S, head_dim]

        # The reference scales q before the product (not inside it): keep that order for fp32 parity.
        query = heads(self.q_proj(hidden) * self.head_dim**-0.5)
        out = F.scaled_dot_product_attention(query, heads(self.k_proj(hidden)), heads(self.v_proj(hidden)),
                                             attn_mask=key_mask, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(windows, length, dim))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block with an exact (erf) GELU MLP."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), key_mask)
        hidden = hidden + self.fc2(F.gelu(self.fc1(self.final_layer_norm(hidden))))
        if hidden.dtype == torch.float16:  # the reference's guard against fp16 overflow
            limit = torch.finfo(torch.float16).max - 1000
            hidden = hidden.clamp(-limit, limit)
        return hidden


class AudioEncoder(nn.Module):
    """log-mel windows [W, n_mels, 3000] -> audio states [W, 750, d_model].

    Always runs on the full padded window: the padded tail leaks into the last valid outputs
    through the convolutions and the pooling, so cropping first would not match the reference.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = embedding(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self, features: torch.Tensor, frame_mask: torch.Tensor, max_tokens: int | None = None
    ) -> torch.Tensor:
        """features [W, n_mels, frames], frame_mask [W, frames] (1 = valid) -> [W, P // 2, d_model].

        With ``max_tokens`` (the most audio tokens any window yields) only the positions those
        tokens and their attention keys need are computed: P = 2 * max_tokens + 2 positions from
        2 * P + 4 frames, which keeps the padded frames the convolutions see at the edge. Valid
        positions never attend past the audio, so this equals the full 1500-position run (the
        tests check it against the reference) while a 5 s clip costs a sixth of a 30 s one.
        """
        features = features.to(self.conv1.weight.dtype)
        positions = self.embed_positions.weight.shape[0]
        if max_tokens is not None:
            positions = min(positions, 2 * max_tokens + 2)
            features = features[..., : min(features.shape[-1], 2 * positions + 4)]
        hidden = F.gelu(self.conv1(features))
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)[:, :positions]  # [W, P, d_model]
        if self.config.scale_embedding:
            hidden = hidden * self.config.d_model**0.5
        hidden = hidden + self.embed_positions.weight[: hidden.shape[1]]
        valid = (frame_mask.sum(-1) - 1) // 2 + 1  # [W] conv2 outputs that see audio
        key_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < valid[:, None]  # [W, S]
        key_mask = key_mask[:, None, None, :]  # [W, 1, 1, S]
        if hidden.device.type == "cuda" and bool(key_mask.all()):
            key_mask = None  # full windows: no mask lets SDPA pick its flash kernel
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        hidden = F.avg_pool1d(hidden.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # [W, S // 2, d]
        return self.layer_norm(hidden)


class MultiModalProjector(nn.Module):
    """One linear map from encoder width to decoder width."""

    def __init__(self, audio_dim: int, text_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(audio_dim, text_dim)

    def forward(self, audio_states: torch.Tensor) -> torch.Tensor:
        return self.linear(audio_states)
