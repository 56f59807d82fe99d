"""Decode steps through one torch.compile'd graph of the whole decoder (the CPU's fast path).

Owned by the runner, used for decode-only steps of at most ``max_batch`` sequences. An eager step
runs about 80 small torch ops a layer (norms, rotary, cache writes, attention), a few microseconds
each: on a CPU that is milliseconds a token beside weight streaming that takes 15-20 ms, and the
compiled graph fuses most of them (bench/RESULTS.md). The inputs are tensors only
(:meth:`AttentionMetadata.decode`), their batch and block-table sizes marked dynamic, so two graphs
serve every step: one for a single sequence and one for 2..max_batch (sizes 0 and 1 are special
to the compiler). Each compiles once when first needed (tens of seconds on a small CPU; Inductor
keeps its generated code on disk, so later runs compile faster). A graph that fails to compile
turns the path off with a warning: the eager step is always correct.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from qwen2audio.engine.request import Request
from qwen2audio.model.attention import AttentionMetadata, KVCache
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration

logger = logging.getLogger(__name__)


class CompiledDecoder:
    def __init__(self, network: Qwen2AudioForConditionalGeneration, caches: list[KVCache], block_size: int,
                 scratch_block: int, max_batch: int) -> None:
        self.network, self.caches = network, caches
        self.block_size, self.scratch_block, self.max_batch = block_size, scratch_block, max_batch
        self.graph = torch.compile(self._forward, dynamic=True)
        self.compiled: set[bool] = set()  # which size classes (batch > 1) have compiled
        self.failed = False

    def handles(self, num_seqs: int) -> bool:
        return not self.failed and 0 < num_seqs <= self.max_batch

    def execute(self, requests: Sequence[Request]) -> torch.Tensor | None:
        """Logits [len(requests), vocab] (float32); None if the graph could not be compiled (the
        caller then runs the step eagerly, as every later one)."""
        inputs = self._inputs(requests)
        for tensor in inputs:
            torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(inputs[3], 1)
        several = len(requests) > 1
        new = several not in self.compiled
        if new:
            logger.info("compiling the decode step for %s (once)", "2+ sequences" if several else "one sequence")
        started = time.perf_counter()
        try:
            with _size_oblivious():
                logits = self.graph(*inputs)
        except Exception:  # a compiler or toolchain problem: never worth failing a request for
            logger.warning("torch.compile of the decode step failed; decoding eagerly", exc_info=True)
            self.failed = True
            return None
        if new:
            self.compiled.add(several)
            logger.info("decode step compiled in %.1f s", time.perf_counter() - started)
        return logits

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        meta = AttentionMetadata.decode(slots, block_tables, context_lens)
        return self.network.logits(self.network(input_ids, positions, meta, self.caches))

    def _inputs(self, requests: Sequence[Request]) -> tuple[torch.Tensor, ...]:
        """(token ids, positions, slots, block tables, context lengths) of one step: the arguments of
        :meth:`_forward`, in its order. Tables are at
        least two blocks wide (the scratch block pads them; the lengths hide it), so a short
        context does not make a width of one, which would need a graph of its own."""
        width = max(2, *(-(-r.num_tokens // self.block_size) for r in requests))
        rows = np.zeros((len(requests), 4 + width), dtype=np.int64)
        rows[:, 4:] = self.scratch_block
        for line, request in zip(rows, requests, strict=True):
            position = request.num_tokens - 1
            blocks = request.table.blocks[: width]
            line[:4] = (request.output_ids[-1], position, request.table.slot(position, self.block_size),
                        position + 1)
            line[4:4 + len(blocks)] = blocks
        table = torch.from_numpy(rows)
        ids, positions, slots, lengths = (table[:, column].contiguous() for column in range(4))
        device = self.network.device
        return tuple(t.to(device) for t in (ids, positions, slots, table[:, 4:].contiguous(), lengths))


def _size_oblivious() -> object:
    """Compile a size seen as 2 as valid for every size >= 2 (else the compiler guards on choices it
    made for the example's exact sizes). A private switch of torch's: without it, compile as is."""
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - a torch without the switch
        import contextlib

        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)
