"""A request's life from admission to retirement: which requests run each step, and what a step's
sampled tokens do to them.

Plain Python (no torch), and the block manager's only user. Every step it decodes every running
request that can get a cache slot (preempting the newest running ones when blocks run out, never
failing), then admits waiting requests for prefill, oldest first, while the token budget and free
blocks allow. After the step, :meth:`Scheduler.update` appends the sampled tokens, publishes
computed blocks to the prefix cache, and retires finished requests, freeing their blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen2audio.engine.block_manager import BlockManager
from qwen2audio.engine.request import Request, RequestOutput, Status

logger = logging.getLogger(__name__)


@dataclass
class ScheduledStep:
    """One step's work: prefills compute ``num_tokens - num_computed`` tokens, decodes one each."""

    prefills: list[Request] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        """Prefills first, then decodes: the order of the step's logits rows."""
        return [*self.prefills, *self.decodes]

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the queue and the KV cache, safe to read from another thread."""

    waiting: int = 0
    running: int = 0
    kv_blocks: int = 1
    kv_blocks_free: int = 1
    preemptions: int = 0
    encoder_cache_bytes: int = 0  # filled in by the engine (the runner owns that cache)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by requests (cached-but-free prefix blocks count as free)."""
        return 1.0 - self.kv_blocks_free / self.kv_blocks


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int = 8192, max_running: int = 256) -> None:
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.requests: dict[str, Request] = {}  # every live request (waiting or running) by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- admission and retirement ---------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; one that could never fit (or whose id is taken) is refused here."""
        # The last token's keys are never computed; a preempted request recomputes all the others
        # in one prefill, so that many must fit one step.
        longest = request.max_total_tokens - 1
        needed = self.blocks.blocks_needed(longest)
        if longest > self.max_batch_tokens or needed > self.blocks.num_blocks:
            raise ValueError(
                f"request {request.request_id} may need {longest} tokens in one step / {needed} KV blocks; "
                f"the engine allows {self.max_batch_tokens} tokens per step and has {self.blocks.num_blocks} blocks"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def live(self, request: Request) -> bool:
        """Still waiting or running (not finished, failed or aborted, and its id not reused)."""
        return self.requests.get(request.request_id) is request

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now and free its blocks; None if it was not live."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.finish_reason = request.finish_reason or "abort"
        self._retire(request)
        return request

    def fail(self, request: Request, message: str) -> RequestOutput:
        """End a request with an error (its blocks freed, nothing published)."""
        request.error, request.finish_reason = message, "error"
        self._retire(request)
        return request.report()

    def _retire(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.table)
        request.status = Status.FINISHED
        if self.live(request):
            del self.requests[request.request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.waiting), len(self.running), self.blocks.num_blocks, self.blocks.num_free,
                           self.num_preemptions)

    # -- scheduling -------------------------------------------------------------------------------

    def can_admit(self, decoding: int) -> bool:
        """Whether a waiting request could start now beside ``decoding`` decodes whose blocks are
        already taken (the admission checks of :meth:`schedule`, without allocating)."""
        if not self.waiting or len(self.running) >= self.max_running:
            return False
        request = self.waiting[0]
        return (request.num_tokens <= self.max_batch_tokens - decoding
                and self.blocks.can_allocate(request.num_tokens, request.block_hashes(self.blocks.block_size)))

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decodes(step)
        budget = self.max_batch_tokens - len(step.decodes)
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            if request.num_tokens > budget:
                break
            hashes = request.block_hashes(self.blocks.block_size)
            if not self.blocks.can_allocate(request.num_tokens, hashes):
                break
            self.waiting.popleft()
            request.table = self.blocks.allocate(request.num_tokens, hashes)
            request.num_computed = request.table.cached_tokens
            request.status = Status.RUNNING
            self.running.append(request)
            step.prefills.append(request)
            budget -= request.num_tokens - request.num_computed
        self.num_preemptions += len(step.preempted)
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

    def reserve_next(self, requests: Sequence[Request]) -> bool:
        """A cache slot for each request's token after the one in flight (a pipelined step); False
        if one is short, when the next plain :meth:`schedule` decides (preempting if it must)."""
        for request in requests:
            if not self.blocks.can_grow(request.table, request.num_tokens + 1):
                return False
            self.blocks.grow(request.table, request.num_tokens + 1)
        return True

    # -- after a step -----------------------------------------------------------------------------

    def update(
        self, requests: Sequence[Request], tokens: Sequence[int], logprobs: Sequence[dict | None], num_prefills: int
    ) -> list[RequestOutput]:
        """Apply one step's sampled tokens (row i belongs to ``requests[i]``; the first
        ``num_prefills`` were prefills). Requests no longer live (aborted while a pipelined step
        ran, or finished by the token before) are skipped; one whose update fails fails alone."""
        outputs = []
        for index, (request, token, logprob) in enumerate(zip(requests, tokens, logprobs, strict=True)):
            if not self.live(request) or request.finish_reason is not None:
                continue
            try:
                outputs.append(self._commit(request, token, logprob, prefill=index < num_prefills))
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                outputs.append(self.fail(request, f"{type(exc).__name__}: {exc}"))
        return outputs

    def _commit(self, request: Request, token: int, logprob: dict | None, prefill: bool) -> RequestOutput:
        """Record a token the model produced for ``request`` (all its earlier tokens are now computed)."""
        request.num_computed = request.num_tokens
        if prefill:
            self._publish(request, request.num_computed)
        delta = request.append(token)
        if logprob is not None:
            request.logprobs.append(logprob)
        if request.finish_reason is not None:
            self._publish(request, request.num_tokens - 1)  # the last token's KV was never computed
            self._retire(request)
        return request.report(delta, [token], [logprob] if logprob else [])

    def _publish(self, request: Request, computed: int) -> None:
        """Offer the request's full blocks among its first ``computed`` tokens to the prefix cache."""
        size = self.blocks.block_size
        self.blocks.publish(request.table, request.block_hashes(size)[: computed // size])
