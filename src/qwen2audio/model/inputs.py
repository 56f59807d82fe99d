"""Flattened model inputs: the tokens several sequences compute in one forward pass, concatenated,
with the rows their audio embeddings replace.

Owns the one assembly path shared by the engine's steps (a slice of each sequence, the rest cached)
and by ``Qwen2Audio.logits`` (whole prompts, no cache); it must not know about KV blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Chunk:
    """The tokens one sequence computes: ``token_ids`` at positions ``start``, ``start + 1``, ...

    ``audio`` holds (offset in the whole sequence, embeddings [n, hidden]) for each clip; the rows of
    a clip that fall inside this chunk replace the embeddings of its placeholder tokens."""

    token_ids: Sequence[int]
    start: int = 0
    audio: Sequence[tuple[int, torch.Tensor]] = field(default_factory=tuple)

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.token_ids))


@dataclass
class FlatInputs:
    """input_ids, positions [N]; audio_embeds [A, hidden] for rows audio_index [A] (None: no audio)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    query_lens: list[int]
    audio_embeds: torch.Tensor | None
    audio_index: torch.Tensor | None

    @property
    def last_rows(self) -> torch.Tensor:
        """[S] the row of each sequence's last token (whose logits pick its next one)."""
        return torch.tensor(self.query_lens, device=self.input_ids.device).cumsum(0) - 1


def flatten(chunks: Sequence[Chunk], device: torch.device) -> FlatInputs:
    """Concatenate the chunks' tokens and positions, and collect the audio rows each one computes."""
    ids: list[int] = []
    positions: list[int] = []
    audio: list[torch.Tensor] = []
    index: list[int] = []
    for chunk in chunks:
        row_start, end = len(ids), chunk.start + len(chunk.token_ids)
        ids.extend(chunk.token_ids)
        positions.extend(chunk.positions)
        for offset, embeds in chunk.audio:
            lo, hi = max(offset, chunk.start), min(offset + embeds.shape[0], end)
            if lo < hi:
                audio.append(embeds[lo - offset:hi - offset])
                index.extend(range(row_start + lo - chunk.start, row_start + hi - chunk.start))
    return FlatInputs(
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        [len(chunk.token_ids) for chunk in chunks],
        torch.cat(audio) if audio else None,
        torch.tensor(index, dtype=torch.long, device=device) if audio else None,
    )
