"""Qwen2-Audio: encode audio windows, project, merge into the prompt's embeddings, decode.

Owns the composition and the merge count check; module names follow the checkpoint
(``audio_tower``, ``multi_modal_projector``, ``language_model``). The decoder's op backend is
given at construction and fixed for the network's life (model/backend.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qwen2audio.config import ModelConfig
from qwen2audio.model.attention import AttentionMetadata, KVCache
from qwen2audio.model.audio_encoder import AudioEncoder, MultiModalProjector
from qwen2audio.model.backend import Backend
from qwen2audio.model.quant import QuantizedLinear
from qwen2audio.model.qwen2 import Qwen2ForCausalLM


class AudioTokenMismatchError(ValueError):
    """The prompt's <|AUDIO|> positions and the encoder's outputs do not pair up."""


class Qwen2AudioForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend | None = None) -> None:
        super().__init__()
        self.config = config
        self.backend = backend or Backend()
        self.audio_tower = AudioEncoder(config.audio)
        self.multi_modal_projector = MultiModalProjector(config.audio.d_model, config.text.hidden_size)
        self.language_model = Qwen2ForCausalLM(config.text, self.backend.ops)

    @property
    def device(self) -> torch.device:
        """Where the weights are (the embedding table stands for all of them)."""
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding table's)."""
        return self.language_model.model.embed_tokens.weight.dtype

    def with_backend(self, backend: Backend) -> Qwen2AudioForConditionalGeneration:
        """A network on these very weights (shared, not copied) that computes with ``backend``'s ops:
        e.g. the eager ops beside the kernels, to check one against the other."""
        if self.backend.onednn or backend.onednn:
            raise ValueError("oneDNN linear layers keep their own weight layout: load the checkpoint again")
        with torch.device("meta"):
            twin = type(self)(self.config, backend)
        for name, module in self.named_modules():  # quantized layers are shared whole: their codes may be
            if isinstance(module, QuantizedLinear):  # held in a kernel's layout that loading cannot redo
                twin.set_submodule(name, module)
        twin.load_state_dict(self.state_dict(), assign=True)
        return twin.eval().requires_grad_(False)

    def encode_audio(
        self, features: torch.Tensor, frame_mask: torch.Tensor, window_tokens: Sequence[int]
    ) -> torch.Tensor:
        """Windows [W, n_mels, frames] -> audio embeddings [sum(window_tokens), hidden], in window order."""
        states = self.audio_tower(features, frame_mask, max(window_tokens))  # [W, P // 2, d_audio]
        kept = torch.cat([states[w, :n] for w, n in enumerate(window_tokens)])  # [A, d_audio]
        return self.multi_modal_projector(kept)

    def embed(
        self, input_ids: torch.Tensor, audio_embeds: torch.Tensor | None, audio_index: torch.Tensor | None
    ) -> torch.Tensor:
        """input_ids [N] -> [N, hidden]; row k of audio_embeds [A, hidden] replaces row audio_index[k].

        Positions come from the prompt's audio spans, not from matching the <|AUDIO|> id, so a
        generated <|AUDIO|> token is just a token. The count check needs no host synchronisation."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if audio_embeds is None:
            return embeds
        if audio_index is None or audio_index.shape[0] != audio_embeds.shape[0]:
            found = None if audio_index is None else audio_index.shape[0]
            raise AudioTokenMismatchError(
                f"the prompt has {found} audio positions but the encoder produced {audio_embeds.shape[0]} rows"
            )
        return embeds.index_copy(0, audio_index, audio_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        caches: list[KVCache] | None = None,
        audio_embeds: torch.Tensor | None = None,
        audio_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flattened tokens [N] -> final hidden states [N, hidden]."""
        embeds = self.embed(input_ids, audio_embeds, audio_index)
        return self.language_model.model(embeds, positions, meta, caches)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)
