"""Which requests run this step: admission, the prefill/decode mix, and preemption.

Plain Python (no torch). Every step it decodes every running request that can get a cache slot
(preempting the newest running ones when blocks run out, never failing), then admits waiting
requests for prefill, oldest first, while the token budget and free blocks allow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen2audio.engine.kv_cache import BlockManager
from qwen2audio.engine.request import Request, Status


@dataclass
class ScheduledStep:
    """One step's work: prefills compute ``num_tokens - num_computed`` tokens, decodes one each."""

    prefills: list[Request] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        hashes_of: Callable[[Request], list[bytes]],
        max_batch_tokens: int = 8192,
        max_running: int = 256,
    ) -> None:
        self.blocks = blocks
        self.hashes_of = hashes_of
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        # The last token's keys are never computed; a preempted request recomputes all the others
        # in one prefill, so that many must fit one step.
        longest = request.max_total_tokens - 1
        needed = self.blocks.blocks_needed(longest)
        if longest > self.max_batch_tokens or needed > self.blocks.num_blocks:
            raise ValueError(
                f"request {request.request_id} may need {longest} tokens in one step / {needed} KV blocks; "
                f"the engine allows {self.max_batch_tokens} tokens per step and has {self.blocks.num_blocks} blocks"
            )
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def can_admit(self, decoding: int) -> bool:
        """Whether a waiting request could start now beside ``decoding`` decodes whose blocks are
        already taken (the admission checks of :meth:`schedule`, without allocating)."""
        if not self.waiting or len(self.running) >= self.max_running:
            return False
        request = self.waiting[0]
        return (request.num_tokens <= self.max_batch_tokens - decoding
                and self.blocks.can_allocate(request.num_tokens, self.hashes_of(request)))

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decodes(step)
        budget = self.max_batch_tokens - len(step.decodes)
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            if request.num_tokens > budget:
                break
            hashes = self.hashes_of(request)
            if not self.blocks.can_allocate(request.num_tokens, hashes):
                break
            self.waiting.popleft()
            request.table = self.blocks.allocate(request.num_tokens, hashes)
            request.num_computed = request.table.cached_tokens
            request.status = Status.RUNNING
            self.running.append(request)
            step.prefills.append(request)
            budget -= request.num_tokens - request.num_computed
        return step

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        """Every running request gets the slot for its next token; newest are preempted if needed."""
        queue = sorted(self.running, key=lambda r: r.arrival)
        kept: list[Request] = []
        while queue:
            request = queue.pop(0)
            while not self.blocks.can_grow(request.table, request.num_tokens):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is request:
                    break
            else:
                self.blocks.grow(request.table, request.num_tokens)
                kept.append(request)
                step.decodes.append(request)
        self.running = kept

    def _preempt(self, request: Request) -> None:
        """Give back the request's blocks; it re-enters the queue first and is recomputed later."""
        self.blocks.free(request.table)
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Retire a request (done, failed or aborted) and free its blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.table)
        request.status = Status.FINISHED
