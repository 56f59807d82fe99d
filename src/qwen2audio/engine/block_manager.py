"""The KV block manager: which fixed-size cache blocks each sequence owns, and prefix reuse.

Plain Python (no torch), so its invariants can be tested exhaustively. It hands out block ids; the
runner owns the tensors behind them. A full block is keyed by a hash chained over every token
before it (audio tokens keyed by their clip's content digest), so two prompts share a block only
when everything up to and including it is identical.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    """A sequence's blocks in order, and how many of its leading tokens came from the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0

    def slot(self, position: int, block_size: int) -> int:
        """Where the keys/values of token ``position`` live in the flattened cache."""
        return self.blocks[position // block_size] * block_size + position % block_size


def block_hashes(token_keys: Sequence[bytes], block_size: int, seed: bytes = b"") -> list[bytes]:
    """Chained hashes of each *full* block of ``token_keys`` (one bytes key per token); ``seed``
    starts the chain (a LoRA adapter's key: the same tokens give other keys and values under it)."""
    hashes: list[bytes] = []
    previous = seed
    for start in range(0, len(token_keys) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        for key in token_keys[start:start + block_size]:
            digest.update(key)
        previous = digest.digest()
        hashes.append(previous)
    return hashes


def token_keys(token_ids: Sequence[int], audio_spans: Sequence[tuple[int, int, str]]) -> list[bytes]:
    """Per-token cache keys: the id, except audio placeholders, keyed by (clip digest, index).

    ``audio_spans`` holds (offset, length, digest) for each clip in the prompt.
    """
    keys = [struct.pack("<q", token) for token in token_ids]
    for offset, length, digest in audio_spans:
        for index in range(length):
            keys[offset + index] = f"{digest}:{index};".encode()
    return keys


class BlockManager:
    """Allocates blocks with reference counts; freed full blocks stay reusable until evicted (LRU)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_counts = [0] * num_blocks
        self._never_used = list(range(num_blocks - 1, -1, -1))  # stack: low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but holding a cached hash, LRU first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used, or cached but unreferenced)."""
        return len(self._never_used) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, hashes: Sequence[bytes], num_tokens: int) -> list[int]:
        """Blocks already holding this prefix; the last token is always left to compute (its logits)."""
        if not self.enable_prefix_cache:
            return []
        usable = (num_tokens - 1) // self.block_size
        found = []
        for digest in hashes[:usable]:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> bool:
        cached = self._cached_prefix(hashes, num_tokens)
        reclaimed = sum(1 for b in cached if self.ref_counts[b] == 0)
        return self.blocks_needed(num_tokens) - len(cached) <= self.num_free - reclaimed

    def allocate(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> BlockTable:
        """Blocks for a prompt of ``num_tokens``; cached prefix blocks are shared, not copied."""
        if not self.can_allocate(num_tokens, hashes):
            raise MemoryError(f"not enough KV blocks for {num_tokens} tokens")
        table = BlockTable()
        for block in self._cached_prefix(hashes, num_tokens):
            self._reference(block)
            table.blocks.append(block)
        table.cached_tokens = len(table.blocks) * self.block_size
        while len(table.blocks) < self.blocks_needed(num_tokens):
            table.blocks.append(self._take_free())
        return table

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(table.blocks) <= self.num_free

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total."""
        while len(table.blocks) < self.blocks_needed(num_tokens):
            table.blocks.append(self._take_free())

    def publish(self, table: BlockTable, hashes: Sequence[bytes]) -> None:
        """Record the hashes of the table's full, computed blocks so later prompts can reuse them."""
        if not self.enable_prefix_cache:
            return
        for block, digest in zip(table.blocks, hashes, strict=False):
            if digest in self._block_of or block in self._hash_of:
                continue
            self._hash_of[block] = digest
            self._block_of[digest] = block

    def free(self, table: BlockTable) -> None:
        """Drop the table's references; unreferenced blocks become reusable. The tail is released
        first, so it is evicted before the head, which other prompts are likelier to share."""
        for block in reversed(table.blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise AssertionError(f"block {block} freed twice")
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._never_used.append(block)
        table.blocks.clear()
        table.cached_tokens = 0

    def _reference(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _take_free(self) -> int:
        if self._never_used:
            block = self._never_used.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise MemoryError("out of KV blocks")
        self.ref_counts[block] = 1
        return block
