"""Projected audio embeddings by clip digest, so a multi-turn chat does not encode a clip twice.

Owns the byte budget and least-recently-used eviction; the runner fills and reads it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """Projected audio embeddings by clip digest, least recently used evicted past a byte budget,
    so a multi-turn chat does not encode the same clip twice."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        """What the cached embeddings take (at most max_bytes, or one entry when that is larger)."""
        return self._bytes

    def get(self, digest: str) -> torch.Tensor | None:
        value = self._entries.get(digest)
        if value is not None:
            self._entries.move_to_end(digest)
            self.hits += 1
        return value

    def put(self, digest: str, value: torch.Tensor) -> None:
        if digest in self._entries:
            return
        self._entries[digest] = value
        self._bytes += value.numel() * value.element_size()
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
