"""Decode steps over fixed input buffers, replayed from CUDA graphs captured per batch-size bucket.

Owned by the runner. A step of B decoding sequences is padded to the next bucket; padded rows
write their key/value to a scratch block no request owns and attend to that one slot, so they
cannot touch real requests. Without capture (the CPU, or ``enforce_eager``) the same buffers and
padding run eagerly, which is how the tests check the indexing without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from qwen2audio.engine.request import Request
from qwen2audio.model.attention import AttentionMetadata, KVCache
from qwen2audio.model.lora import LoraContext
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
_FIELDS = 5  # per row: token id, position, slot, context length, LoRA slot; then the block table


class StaticDecoder:
    def __init__(
        self,
        network: Qwen2AudioForConditionalGeneration,
        caches: list[KVCache],
        block_size: int,
        scratch_block: int,
        max_context: int,
        max_batch: int,
    ) -> None:
        self.network, self.caches = network, caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.width = -(-max_context // block_size)  # block-table columns: enough for the longest context
        device = network.device
        rows, columns = self.buckets[-1], _FIELDS + self.width
        # Two host buffers, used in turn: with pipelined steps the copy from one may still be queued
        # when the next step's rows are written (the one before it has been waited for).
        pinned = device.type == "cuda"
        self.hosts = [torch.zeros(rows, columns, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.sampled = [torch.zeros(rows, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]  # read back
        self.turn = 0
        self.inputs = torch.zeros(rows, columns, dtype=torch.int64, device=device)
        self._pad(self.hosts[0], 0, rows)
        self.inputs.copy_(self.hosts[0])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora: LoraContext | None = None  # set by the runner when the engine has adapter slots
        self._capturing = self._adapters = False

    def bucket(self, num_seqs: int) -> int | None:
        """The padded batch size for ``num_seqs`` decodes; None if it is past the largest bucket."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def execute(
        self, requests: Sequence[Request], ahead: int = 0, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [len(requests), vocab] (float32) of one decode step of these requests.

        ``ahead`` = 1: each request's newest token is not on the host yet; ``tokens`` [len(requests)]
        holds them on the device (a pipelined step, launched before the previous one was read)."""
        size = self.bucket(len(requests))
        assert size is not None, "more decodes than the largest bucket"
        host = self.hosts[self.turn]
        self.turn ^= 1
        self._fill(host, requests, size, ahead)
        self._adapters = any(request.adapter is not None for request in requests)
        self.inputs[:size].copy_(host[:size], non_blocking=True)
        if tokens is not None:
            self.inputs[: len(requests), 0].copy_(tokens)
        captured = self.graphs.get(size)
        if captured is None:
            logits = self._forward(size)
        else:
            captured[0].replay()
            logits = captured[1]
        return logits[: len(requests)]

    def read_back(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the tokens sampled from the last run's logits to pinned host memory (the
        buffer of that run's turn, so it is free by the same argument as the inputs'); returns the
        host view and an event to wait on (None on the CPU, where the copy is done at once)."""
        host = self.sampled[self.turn ^ 1][: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        if not tokens.is_cuda:
            return host, None
        done = torch.cuda.Event()
        done.record()
        return host, done

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first so that the smaller ones reuse its memory pool."""
        started = time.perf_counter()
        torch.cuda.synchronize()
        self.graphs, pool, self._capturing = {}, None, True
        try:
            for size in reversed(self.buckets):
                for _ in range(2):  # first launches compile the Triton kernels and pick cuBLAS algorithms
                    self._forward(size)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = (graph, logits)
            torch.cuda.synchronize()
        except BaseException:
            self.graphs = {}  # a half-captured set is none: steps run the buffers eagerly
            raise
        finally:
            self._capturing = False
        logger.info("captured %d decode graphs (batch sizes %s) in %.1f s", len(self.graphs),
                    self.buckets, time.perf_counter() - started)

    def _forward(self, size: int) -> torch.Tensor:
        rows = self.inputs[:size]  # [size, FIELDS + width]; every view below is a strided column
        meta = AttentionMetadata(
            [1] * size, [self.width * self.block_size] * size, rows[:, 2], rows[:, _FIELDS:], 0, rows[:, 3],
        )
        every_layer = self._capturing or bool(self.graphs)  # a graph holds the products of every slot
        adapters = self.lora is not None and (every_layer or self._adapters)
        with self.lora.using(every_layer, decoder=rows[:, 4], head=rows[:, 4]) if adapters else nullcontext():
            return self.network.logits(self.network(rows[:, 0], rows[:, 1], meta, self.caches))

    def _fill(self, host_buffer: torch.Tensor, requests: Sequence[Request], size: int, ahead: int) -> None:
        """Write this step's rows into a pinned host buffer (a numpy view: no per-element torch calls)."""
        host = host_buffer.numpy()
        for row, request in enumerate(requests):
            blocks = request.table.blocks
            position = request.num_tokens - 1 + ahead
            line = host[row]
            line[0] = request.output_ids[-1] if not ahead else 0  # ahead: copied in on the device
            line[1] = position
            line[2] = request.table.slot(position, self.block_size)
            line[3] = position + 1
            line[4] = request.adapter.slot if request.adapter is not None else 0
            line[_FIELDS:_FIELDS + len(blocks)] = blocks
        self._pad(host_buffer, len(requests), size)

    def _pad(self, host_buffer: torch.Tensor, start: int, stop: int) -> None:
        """Rows [start, stop): token 0 at position 0, written to and reading only the scratch block."""
        host = host_buffer.numpy()
        host[start:stop, :_FIELDS] = (0, 0, self.scratch_block * self.block_size, 1, 0)
        host[start:stop, _FIELDS:] = self.scratch_block
