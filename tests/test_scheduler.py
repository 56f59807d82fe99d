"""Property tests for the paged KV block manager and the continuous-batching scheduler.

Plain Python: no model and no tensors. The real scheduler is driven as Engine.step drives it
(schedule -> a fake model step -> Scheduler.update, which appends, publishes and retires), where the
fake token depends only on the request's token history. That makes a request's output independent
of batching, preemption and prefix-cache hits, so every request must produce exactly what it
produces when run alone.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qwen2audio.config import GenerationConfig
from qwen2audio.engine.block_manager import BlockManager, BlockTable, block_hashes, token_keys
from qwen2audio.engine.request import Prompt, Request, SamplingParams, Status
from qwen2audio.engine.scheduler import ScheduledStep, Scheduler
from qwen2audio.text.tokenizer import Tokenizer

DATA = pathlib.Path(__file__).parent / "data"
EOS = 151645
AUDIO = 151646  # <|AUDIO|> placeholder: its cache key comes from the clip digest, not the id
# What a checkpoint without generation_config.json gives.
DEFAULTS = GenerationConfig(frozenset({EOS}))

Span = tuple[int, int, str]  # (offset, length, digest), as token_keys takes them

# Shared stems so that random prompts often share prefixes (and so cache blocks). Stems 1 and 2
# share four tokens; stem 3 shares two with them and then holds a four-token audio clip.
STEMS: tuple[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], ...] = (
    ((), ()),
    ((10, 11, 12, 13, 14, 15, 16, 17), ()),
    ((10, 11, 12, 13, 20, 21, 22), ()),
    ((10, 11, AUDIO, AUDIO, AUDIO, AUDIO, 12), ((2, 4),)),
)


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DATA / "qwen2-tokenizer")


@st.composite
def prompts(draw: st.DrawFn, max_tail: int = 6) -> tuple[list[int], list[Span]]:
    """A prompt built from a shared stem plus a short random tail over a tiny alphabet."""
    stem, clips = draw(st.sampled_from(STEMS))
    tail = draw(st.lists(st.integers(0, 3), min_size=0 if stem else 1, max_size=max_tail))
    spans = [(offset, length, draw(st.sampled_from(("aa", "bb")))) for offset, length in clips]
    return [*stem, *tail], spans


# ---------------------------------------------------------------------------------------------
# Checks shared by the block-manager and scheduler tests
# ---------------------------------------------------------------------------------------------


@dataclass
class Held:
    """What a live table stands for: its token ids and cache keys, and how many tokens are computed."""

    ids: list[int]
    keys: list[bytes]
    table: BlockTable
    computed: int


def check_invariants(manager: BlockManager, tables: Sequence[BlockTable]) -> None:
    """Every block is exactly one of: referenced (count == owners), evictable, never used."""
    owners = [0] * manager.num_blocks
    for table in tables:
        for block in table.blocks:
            owners[block] += 1
    assert owners == manager.ref_counts, "reference counts differ from the tables that hold blocks"
    free = set(manager._never_used)
    evictable = set(manager._evictable)
    assert len(free) == len(manager._never_used) and not (free & evictable), "a block is listed twice"
    for block in range(manager.num_blocks):
        in_use = owners[block] > 0
        assert in_use + (block in free) + (block in evictable) == 1, f"block {block} is in two states"
    assert all(manager._block_of[h] == b for b, h in manager._hash_of.items()), "hash maps disagree"


def check_tables(manager: BlockManager, held: Sequence[Held]) -> None:
    """Reference counts match, and the prefix cache only ever shares identical, computed content."""
    check_invariants(manager, [h.table for h in held])
    size = manager.block_size
    referenced = {block for h in held for block in h.table.blocks}
    assert manager.num_free + len(referenced) == manager.num_blocks

    holders: dict[int, list[tuple[Held, int]]] = {}
    for h in held:
        assert len(h.table.blocks) >= manager.blocks_needed(h.computed)
        for index, block in enumerate(h.table.blocks):
            holders.setdefault(block, []).append((h, index))
            digest = manager._hash_of.get(block)
            if digest is not None:
                # A published block covers computed tokens only, with exactly this table's content.
                assert (index + 1) * size <= h.computed, f"block {block} published before it was computed"
                assert block_hashes(h.keys, size)[index] == digest, f"block {block} holds other content"
        tail = len(h.ids) // size  # blocks from here on are still being written
        for block in h.table.blocks[tail:]:
            assert manager.ref_counts[block] == 1, f"block {block} is shared while still being written"
            assert block not in manager._hash_of, f"block {block} is published while still being written"

    for block, owners in holders.items():
        first, first_index = owners[0]
        for other, index in owners[1:]:
            assert index == first_index, f"block {block} is shared at positions {first_index} and {index}"
            end = (index + 1) * size
            assert len(first.ids) >= end and len(other.ids) >= end, f"shared block {block} is not full"
            assert first.ids[:end] == other.ids[:end], f"block {block} shared between different prefixes"
            assert first.keys[:end] == other.keys[:end], f"block {block} shared between different audio"


# ---------------------------------------------------------------------------------------------
# BlockManager alone
# ---------------------------------------------------------------------------------------------


@dataclass
class Seq:
    ids: list[int]
    spans: list[Span]
    table: BlockTable

    @property
    def keys(self) -> list[bytes]:
        return token_keys(self.ids, self.spans)

    def held(self) -> Held:
        # In this test every token a table covers counts as computed.
        return Held(self.ids, self.keys, self.table, len(self.ids))


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / publish / free, checking the invariants after every operation."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from((1, 2, 3, 4)), cache=st.booleans())
    def setup(self, num_blocks: int, block_size: int, cache: bool) -> None:
        self.manager = BlockManager(num_blocks, block_size, enable_prefix_cache=cache)
        self.live: list[Seq] = []
        self.history: list[tuple[tuple[int, ...], tuple[Span, ...]]] = []

    def hashes(self, seq: Seq) -> list[bytes]:
        return block_hashes(seq.keys, self.manager.block_size)

    @rule(prompt=prompts(), publish=st.booleans())
    def allocate(self, prompt: tuple[list[int], list[Span]], publish: bool) -> None:
        self._allocate(*prompt, publish)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), publish=st.booleans())
    def allocate_again(self, data: st.DataObject, publish: bool) -> None:
        """The same prompt once more (a common pattern: a shared system prompt or a retried request)."""
        ids, spans = data.draw(st.sampled_from(self.history))
        self._allocate(list(ids), list(spans), publish)

    def _allocate(self, ids: list[int], spans: list[Span], publish: bool) -> None:
        manager = self.manager
        self.history.append((tuple(ids), tuple(spans)))
        hashes = block_hashes(token_keys(ids, spans), manager.block_size)
        if not manager.can_allocate(len(ids), hashes):
            before = (list(manager.ref_counts), manager.num_free)
            with pytest.raises(MemoryError):
                manager.allocate(len(ids), hashes)
            assert (list(manager.ref_counts), manager.num_free) == before, "a failed allocate changed state"
            event("allocate refused")
            return
        table = manager.allocate(len(ids), hashes)
        assert len(table.blocks) == manager.blocks_needed(len(ids))
        assert table.cached_tokens % manager.block_size == 0
        assert 0 <= table.cached_tokens < len(ids), "the last prompt token must always be computed"
        if not manager.enable_prefix_cache:
            assert table.cached_tokens == 0
        # The cached prefix is the longest one available (within the usable part of the prompt).
        usable = (len(ids) - 1) // manager.block_size
        hit = table.cached_tokens // manager.block_size
        if manager.enable_prefix_cache and hit < usable:
            assert hashes[hit] not in manager._block_of
        if table.cached_tokens:
            event("prefix cache hit")
        self.live.append(Seq(ids, spans, table))
        if publish:  # as after a prefill: every full block of the prompt
            manager.publish(table, hashes)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def grow(self, data: st.DataObject, extra: list[int]) -> None:
        manager = self.manager
        seq = data.draw(st.sampled_from(self.live))
        total = len(seq.ids) + len(extra)
        if manager.can_grow(seq.table, total):
            manager.grow(seq.table, total)
            seq.ids.extend(extra)
            assert len(seq.table.blocks) == manager.blocks_needed(total)
        else:
            assert manager.blocks_needed(total) - len(seq.table.blocks) > manager.num_free
            event("grow refused")

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        full = len(seq.ids) // self.manager.block_size
        count = data.draw(st.integers(0, full))
        self.manager.publish(seq.table, self.hashes(seq)[:count])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.manager.free(seq.table)
        assert seq.table.blocks == [] and seq.table.cached_tokens == 0
        self.manager.free(seq.table)  # freeing an emptied table again is harmless

    @invariant()
    def consistent(self) -> None:
        check_tables(self.manager, [seq.held() for seq in self.live])

    def teardown(self) -> None:
        manager = getattr(self, "manager", None)
        if manager is None:
            return
        for seq in self.live:
            manager.free(seq.table)
        check_invariants(manager, [])
        assert manager.num_free == manager.num_blocks
        assert all(count == 0 for count in manager.ref_counts)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [(0, 4, 0), (3, 4, 0), (4, 4, 1), (7, 4, 1), (8, 4, 2), (5, 1, 5), (9, 2, 4)],
)
def test_block_hashes_cover_full_blocks_only(num_tokens: int, block_size: int, expected: int) -> None:
    assert len(block_hashes(token_keys(list(range(num_tokens)), []), block_size)) == expected


def test_block_hashes_are_chained() -> None:
    base = block_hashes(token_keys([1, 2, 3, 4, 5, 6], []), 2)
    assert len(set(base)) == 3
    changed_first = block_hashes(token_keys([9, 2, 3, 4, 5, 6], []), 2)
    assert all(a != b for a, b in zip(base, changed_first, strict=True)), "a change reaches every later block"
    changed_last = block_hashes(token_keys([1, 2, 3, 4, 5, 9], []), 2)
    assert changed_last[:2] == base[:2] and changed_last[2] != base[2]


@pytest.mark.parametrize(
    ("ids", "spans_a", "spans_b", "same_blocks"),
    [
        # Same ids, different clips: every block from the clip on differs.
        ([1, AUDIO, AUDIO, AUDIO, AUDIO, 2], [(1, 4, "aa")], [(1, 4, "bb")], [False, False, False]),
        ([1, 2, AUDIO, AUDIO, 3, 4], [(2, 2, "aa")], [(2, 2, "bb")], [True, False, False]),
        # Same clip: identical.
        ([1, 2, AUDIO, AUDIO, 3, 4], [(2, 2, "aa")], [(2, 2, "aa")], [True, True, True]),
        # An audio clip is not the same as its placeholder ids.
        ([1, 2, AUDIO, AUDIO], [(2, 2, "aa")], [], [True, False]),
        # Two clips swapped.
        ([AUDIO, AUDIO, AUDIO, AUDIO], [(0, 2, "aa"), (2, 2, "bb")], [(0, 2, "bb"), (2, 2, "aa")], [False, False]),
    ],
)
def test_audio_digest_keys_the_hash(
    ids: list[int], spans_a: list[Span], spans_b: list[Span], same_blocks: list[bool]
) -> None:
    hashes_a = block_hashes(token_keys(ids, spans_a), 2)
    hashes_b = block_hashes(token_keys(ids, spans_b), 2)
    assert [a == b for a, b in zip(hashes_a, hashes_b, strict=True)] == same_blocks


def test_different_audio_is_not_shared() -> None:
    manager = BlockManager(8, 2)
    ids = [1, 2, AUDIO, AUDIO, 3, 4, 5]
    first_hashes = block_hashes(token_keys(ids, [(2, 2, "aa")]), 2)
    first = manager.allocate(len(ids), first_hashes)
    manager.publish(first, first_hashes)
    other = manager.allocate(len(ids), block_hashes(token_keys(ids, [(2, 2, "bb")]), 2))
    assert other.cached_tokens == 2 and other.blocks[0] == first.blocks[0]
    assert set(other.blocks[1:]).isdisjoint(first.blocks)
    same = manager.allocate(len(ids), first_hashes)
    assert same.cached_tokens == 6 and same.blocks[:3] == first.blocks[:3]
    check_invariants(manager, [first, other, same])


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "cached"),
    [(1, 2, 0), (2, 2, 0), (3, 2, 2), (4, 2, 2), (5, 2, 4), (8, 4, 4), (9, 4, 8), (3, 1, 2)],
)
def test_cached_prefix_leaves_the_last_token(num_tokens: int, block_size: int, cached: int) -> None:
    manager = BlockManager(16, block_size)
    hashes = block_hashes(token_keys(list(range(num_tokens)), []), block_size)
    first = manager.allocate(num_tokens, hashes)
    manager.publish(first, hashes)
    first_blocks = list(first.blocks)
    manager.free(first)
    again = manager.allocate(num_tokens, hashes)
    assert again.cached_tokens == cached
    assert again.blocks[: cached // block_size] == first_blocks[: cached // block_size]


def test_prefix_cache_disabled_never_shares() -> None:
    manager = BlockManager(8, 2, enable_prefix_cache=False)
    hashes = block_hashes(token_keys([1, 2, 3, 4, 5], []), 2)
    first = manager.allocate(5, hashes)
    manager.publish(first, hashes)
    second = manager.allocate(5, hashes)
    assert second.cached_tokens == 0 and set(first.blocks).isdisjoint(second.blocks)


def test_can_allocate_counts_reclaimed_cached_blocks() -> None:
    manager = BlockManager(2, 2)
    hashes = block_hashes(token_keys([1, 2, 3], []), 2)
    first = manager.allocate(3, hashes)
    manager.publish(first, hashes)
    manager.free(first)
    assert manager.num_free == 2
    # One cached block (reclaimed from the free pool) plus one new one: exactly fits.
    assert manager.can_allocate(3, hashes)
    again = manager.allocate(3, hashes)
    assert again.cached_tokens == 2 and manager.num_free == 0
    assert not manager.can_allocate(1)
    with pytest.raises(MemoryError):
        manager.allocate(1)
    check_invariants(manager, [again])


def test_lru_eviction_order() -> None:
    """Never-used blocks go first; then cached blocks, least recently freed first.

    Within one table the blocks are released tail first, so a sequence's tail is evicted before
    its head (the head is what other prompts can still share).
    """
    manager = BlockManager(5, 2)
    ids_a, ids_b = [1, 2, 3, 4, 5], [7, 8, 9]
    hashes_a = block_hashes(token_keys(ids_a, []), 2)
    hashes_b = block_hashes(token_keys(ids_b, []), 2)
    a = manager.allocate(5, hashes_a)  # 3 blocks, the first two full
    b = manager.allocate(3, hashes_b)  # 2 blocks, the first full
    assert manager.num_free == 0
    manager.publish(a, hashes_a)
    manager.publish(b, hashes_b)
    a_head, a_second, a_tail = a.blocks
    b_head, b_tail = b.blocks
    manager.free(a)
    manager.free(b)
    assert manager.num_free == 5

    taken = manager.allocate(10).blocks  # no hashes: takes all five, in eviction order
    assert set(taken[:2]) == {a_tail, b_tail}, "unpublished blocks are reused before cached ones"
    assert taken[2:] == [a_second, a_head, b_head], "cached blocks: least recently freed first, tail first"
    manager.free(BlockTable(taken))
    # Everything was evicted: the old prompts no longer hit the cache.
    assert manager.allocate(5, hashes_a).cached_tokens == 0


def test_lru_reuse_refreshes_a_block() -> None:
    manager = BlockManager(4, 2)
    hashes_a = block_hashes(token_keys([1, 2, 3], []), 2)
    hashes_b = block_hashes(token_keys([4, 5, 6], []), 2)
    a = manager.allocate(3, hashes_a)
    b = manager.allocate(3, hashes_b)
    manager.publish(a, hashes_a)
    manager.publish(b, hashes_b)
    a_head, b_head = a.blocks[0], b.blocks[0]
    manager.free(a)
    manager.free(b)  # LRU order: a_head, then b_head
    again = manager.allocate(3, hashes_a)  # touches a_head: it becomes the most recently used
    assert again.cached_tokens == 2 and again.blocks[0] == a_head
    manager.free(again)
    taken = manager.allocate(8).blocks
    assert taken[-2:] == [b_head, a_head]
    check_invariants(manager, [BlockTable(taken)])


# ---------------------------------------------------------------------------------------------
# Scheduler with a fake model step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    max_new: int
    arrive: int = 0  # the step at which the request is added

    @property
    def max_total(self) -> int:
        return len(self.ids) + self.max_new


def fake_token(history: Sequence[int]) -> int:
    """A deterministic 'model': the next token depends only on the token history (sometimes EOS)."""
    value = int.from_bytes(hashlib.blake2b(repr(list(history)).encode(), digest_size=8).digest(), "little")
    return EOS if value % 20 == 0 else value % 1000


def fake_token_no_eos(history: Sequence[int]) -> int:
    """Like fake_token, but never ends early: for hand-written cases that need long requests."""
    token = fake_token(history)
    return 0 if token == EOS else token


def make_request(spec: Spec) -> Request:
    spans = spec.spans
    prompt = Prompt(
        list(spec.ids),
        audios=[],
        offsets=[s[0] for s in spans],
        digests=[s[2] for s in spans],
        lengths=[s[1] for s in spans],
    )
    params = SamplingParams(max_new_tokens=spec.max_new).with_defaults(DEFAULTS)
    return Request(prompt, params, tokenizer().detokenizer(), frozenset({EOS}), spec.max_total)


def keys_of(request: Request) -> list[bytes]:
    prompt = request.prompt
    return token_keys(request.all_ids, list(zip(prompt.offsets, prompt.lengths, prompt.digests, strict=True)))


class Simulation:
    """The real Scheduler (and its BlockManager) driven like Engine.step, with a fake model,
    checking invariants around every step."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_batch_tokens: int,
        max_running: int = 256,
        prefix_cache: bool = True,
        model: Callable[[Sequence[int]], int] = fake_token,
    ) -> None:
        self.model = model
        self.manager = BlockManager(num_blocks, block_size, prefix_cache)
        self.scheduler = Scheduler(self.manager, max_batch_tokens, max_running)
        self.stats: Counter[str] = Counter()

    def hashes_of(self, request: Request) -> list[bytes]:
        """Computed here from the token keys, independently of Request.block_hashes."""
        return block_hashes(keys_of(request), self.manager.block_size)

    def abort(self, request: Request) -> None:
        assert self.scheduler.abort(request.request_id) is request
        assert request.finish_reason == "abort" and request.finished and request.table.blocks == []
        assert self.scheduler.abort(request.request_id) is None, "aborting twice found the request again"
        self.stats["aborted"] += 1

    def check(self) -> None:
        scheduler, manager = self.scheduler, self.manager
        waiting, running = list(scheduler.waiting), scheduler.running
        assert len({id(r) for r in waiting}) == len(waiting), "a request is queued twice"
        assert len({id(r) for r in running}) == len(running), "a request runs twice"
        assert not {id(r) for r in waiting} & {id(r) for r in running}, "a request is both waiting and running"
        assert len(running) <= scheduler.max_running
        # Admission is strictly oldest first and preempted requests re-enter at the front, so the
        # queue always stays in arrival order.
        assert [r.arrival for r in waiting] == sorted(r.arrival for r in waiting), "waiting queue out of order"
        for request in waiting:
            assert request.status is Status.WAITING and request.finish_reason is None
            assert request.table.blocks == [], "a waiting request holds KV blocks"
            assert request.num_computed == 0
        for request in running:
            assert request.status is Status.RUNNING and request.finish_reason is None
        check_tables(manager, [Held(r.all_ids, keys_of(r), r.table, r.num_computed) for r in running])

    def check_step(self, step: ScheduledStep, busy: bool) -> None:
        scheduler, manager = self.scheduler, self.manager
        size = manager.block_size
        scheduled = [*step.prefills, *step.decodes]
        assert len({id(r) for r in scheduled}) == len(scheduled), "a request is scheduled twice in one step"
        # Everything running is scheduled every step, and nothing else is.
        assert {id(r) for r in scheduled} == {id(r) for r in scheduler.running}
        tokens = sum(r.num_tokens - r.num_computed for r in step.prefills) + len(step.decodes)
        assert tokens <= scheduler.max_batch_tokens, f"{tokens} tokens in one step"
        for request in step.prefills:
            assert request.num_computed == request.table.cached_tokens
            assert request.num_computed % size == 0 and request.num_computed < request.num_tokens
        for request in step.decodes:
            assert request.num_computed == request.num_tokens - 1, "a decode must compute exactly one token"
        for request in scheduled:
            assert len(request.table.blocks) == manager.blocks_needed(request.num_tokens)
        for request in step.preempted:
            # Back in the queue, or (when the prefix cache still holds its blocks) re-admitted at once.
            readmitted = any(request is r for r in step.prefills)
            assert readmitted or any(request is w for w in scheduler.waiting)
            self.stats["readmitted at once"] += readmitted
        if busy:
            assert not step.empty, "requests are waiting or running but nothing was scheduled (stall)"

    def check_published(self, request: Request, prefill: bool) -> None:
        """After a prefill every full computed block is in the prefix cache (and at the end every
        full block but the one holding the never-computed last token), under its content's hash."""
        size = self.manager.block_size
        computed = request.num_tokens - 1 if request.finish_reason is not None else request.num_computed
        if not self.manager.enable_prefix_cache or not (prefill or request.finish_reason is not None):
            return
        for digest in self.hashes_of(request)[: computed // size]:
            assert digest in self.manager._block_of, "a computed full block was not published"

    def step(self) -> ScheduledStep:
        """One Engine.step with the fake model."""
        busy = self.scheduler.num_unfinished > 0
        running = self.scheduler.running
        grown = all(len(r.table.blocks) >= self.manager.blocks_needed(r.num_tokens) for r in running)
        admits = self.scheduler.can_admit(len(running))
        step = self.scheduler.schedule()
        if grown and not step.preempted:  # the pipelined engine's question: would a prefill start?
            assert admits == bool(step.prefills)
        self.check_step(step, busy)
        self.check()
        self.stats["preempted"] += len(step.preempted)
        self.stats["cache hits"] += sum(1 for r in step.prefills if r.num_computed)
        self.stats["resumed"] += sum(1 for r in step.prefills if r.output_ids)
        before = {id(r): (r.num_tokens, r.num_computed) for r in step.requests}
        tokens = [self.model(r.all_ids) for r in step.requests]
        outputs = self.scheduler.update(step.requests, tokens, [None] * len(tokens), len(step.prefills))
        assert [o.request_id for o in outputs] == [r.request_id for r in step.requests], "an output per request"
        for request, token, output in zip(step.requests, tokens, outputs, strict=True):
            num_tokens, _ = before[id(request)]
            assert request.output_ids[-1] == token and request.num_tokens == num_tokens + 1
            assert output.token_ids == [token] and output.finished == (request.finish_reason is not None)
            self.check_published(request, prefill=any(request is p for p in step.prefills))
            if request.finish_reason is not None:
                self.stats[f"finished: {request.finish_reason}"] += 1
                assert request.status is Status.FINISHED and request.table.blocks == []
                assert request.request_id not in self.scheduler.requests
            else:
                assert request.num_computed == num_tokens, "every token before the new one is computed"
        self.check()
        return step

    def run(
        self, specs: Sequence[Spec], aborts: Sequence[tuple[int, int]] = (), max_steps: int = 5000
    ) -> list[Request]:
        """Add each spec at its arrival step, abort (step, pick) at the start of that step, run to the end."""
        requests: list[Request | None] = [None] * len(specs)
        last_event = max([s.arrive for s in specs] + [a for a, _ in aborts], default=0)
        number = 0
        while number <= last_event or self.scheduler.num_unfinished:
            assert number < max_steps, f"not done after {max_steps} steps (livelock?)"
            for index, spec in enumerate(specs):
                if spec.arrive == number:
                    requests[index] = make_request(spec)
                    self.scheduler.add(requests[index])
            for at, pick in aborts:
                candidates = [*self.scheduler.waiting, *self.scheduler.running]
                if at == number and candidates:
                    self.abort(sorted(candidates, key=lambda r: r.arrival)[pick % len(candidates)])
            self.check()
            self.step()
            number += 1
        check_invariants(self.manager, [])
        assert self.manager.num_free == self.manager.num_blocks, "blocks leaked after every request finished"
        assert not self.scheduler.requests, "a finished request is still registered"
        done = [r for r in requests if r is not None]
        assert len(done) == len(specs)
        return done


@functools.cache
def solo_output(
    spec: Spec, block_size: int, model: Callable[[Sequence[int]], int] = fake_token
) -> tuple[tuple[int, ...], str]:
    """What the request produces alone, with ample blocks and token budget."""
    alone = replace(spec, arrive=0)
    blocks = BlockManager(1, block_size).blocks_needed(spec.max_total) + 4
    (request,) = Simulation(blocks, block_size, max_batch_tokens=10_000, model=model).run([alone])
    assert request.finish_reason in ("stop", "length")
    return tuple(request.output_ids), request.finish_reason


def expected_output(spec: Spec) -> list[int]:
    """The fake model's output computed directly (the solo run must agree with it)."""
    history, output = list(spec.ids), []
    while len(output) < spec.max_new:
        token = fake_token(history)
        history.append(token)
        output.append(token)
        if token == EOS:
            break
    return output


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    ids, spans = draw(prompts(max_tail=5))
    return Spec(tuple(ids), tuple(spans), draw(st.integers(1, 10)), draw(st.integers(0, 5)))


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from((1, 2, 4)))
    requests = draw(st.lists(specs(), min_size=2, max_size=7))
    sizer = BlockManager(1, block_size)
    # Small pools, so that preemption is frequent, but every request fits alone.
    num_blocks = max(sizer.blocks_needed(s.max_total) for s in requests) + draw(st.sampled_from((0, 1, 2, 4)))
    # A preempted request comes back with up to max_total - 1 tokens and is prefilled in one step, so
    # the budget must hold that (see test_preempted_request_longer_than_the_token_budget_stalls).
    max_batch_tokens = max(s.max_total - 1 for s in requests) + draw(st.integers(0, 12))
    return {
        "requests": requests,
        "num_blocks": num_blocks,
        "block_size": block_size,
        "max_batch_tokens": max_batch_tokens,
        "max_running": draw(st.integers(1, 6)),
        "prefix_cache": draw(st.booleans()),
        "aborts": draw(st.lists(st.tuples(st.integers(0, 25), st.integers(0, 50)), max_size=3)),
    }


def test_scheduler_random_workloads() -> None:
    totals: Counter[str] = Counter()

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(workload=workloads())
    def run(workload: dict) -> None:
        sim = Simulation(
            workload["num_blocks"],
            workload["block_size"],
            workload["max_batch_tokens"],
            workload["max_running"],
            workload["prefix_cache"],
        )
        requests = sim.run(workload["requests"], workload["aborts"])
        for spec, request in zip(workload["requests"], requests, strict=True):
            assert request.finished and request.table.blocks == []
            expected, reason = solo_output(spec, workload["block_size"])
            if request.finish_reason == "abort":
                assert tuple(request.output_ids) == expected[: len(request.output_ids)]
            else:
                assert tuple(request.output_ids) == expected, "batching/preemption changed a request's output"
                assert request.finish_reason == reason
        for name, count in sim.stats.items():
            if count:
                event(name)
        totals.update(sim.stats)

    run()
    # The workloads must actually exercise preemption, resumption and prefix-cache hits.
    assert totals["preempted"] > 0 and totals["resumed"] > 0 and totals["cache hits"] > 0, dict(totals)


@pytest.mark.parametrize(
    "spec",
    [
        Spec((10, 11, 12), (), 8),
        Spec((10, 11, AUDIO, AUDIO, AUDIO, AUDIO, 12), ((2, 4, "aa"),), 10),
        Spec((1,), (), 1),
        Spec((5, 5, 5, 5, 5), (), 6),
    ],
)
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_solo_run_matches_the_fake_model(spec: Spec, block_size: int) -> None:
    assert list(solo_output(spec, block_size)[0]) == expected_output(spec)


def test_preemption_resumes_with_the_same_tokens() -> None:
    """Two long requests on a pool that only fits one: the newer is preempted, recomputed, and the
    result is the same as running alone (and its own published blocks serve the re-prefill)."""
    first = Spec((10, 11, 12, 13), (), 10)
    second = Spec((10, 11, 12, 13, 20, 21), (), 10, arrive=1)
    sim = Simulation(num_blocks=9, block_size=2, max_batch_tokens=64, model=fake_token_no_eos)
    requests = sim.run([first, second])
    assert sim.stats["preempted"] > 0 and sim.stats["resumed"] > 0 and sim.stats["cache hits"] > 0
    for spec, request in zip([first, second], requests, strict=True):
        assert tuple(request.output_ids) == solo_output(spec, 2, fake_token_no_eos)[0]
        assert len(request.output_ids) == spec.max_new


def test_preempts_the_newest_first() -> None:
    """The oldest request needs a block first; the newest (not the middle one) gives way."""
    sim = Simulation(num_blocks=5, block_size=2, max_batch_tokens=64, model=fake_token_no_eos)
    old = make_request(Spec((1, 2), (), 5))  # 1 block, needs a 2nd for its first decode
    mid = make_request(Spec((3, 4, 5), (), 5))  # 2 blocks, enough for its first decode
    new = make_request(Spec((6, 7, 8), (), 5))  # 2 blocks
    late = make_request(Spec((9,), (), 1))
    for request in (old, mid, new, late):
        sim.scheduler.add(request)
    step = sim.step()
    assert step.prefills == [old, mid, new] and not step.preempted and list(sim.scheduler.waiting) == [late]
    step = sim.step()
    assert step.preempted == [new] and step.decodes == [old, mid]
    assert list(sim.scheduler.waiting) == [new, late], "a preempted request goes back to the front of the queue"
    sim.run([])
    for request in (old, mid, new, late):
        assert request.finish_reason == "length"


def test_waiting_requests_are_admitted_oldest_first_within_the_budget() -> None:
    sim = Simulation(num_blocks=64, block_size=2, max_batch_tokens=10, model=fake_token_no_eos)
    a, b, c = (make_request(Spec(tuple(range(n)), (), 3)) for n in (4, 5, 3))
    for request in (a, b, c):
        sim.scheduler.add(request)
    step = sim.step()
    # a (4) + b (5) fill 9 of 10 tokens; c (3) does not fit and must not jump the queue.
    assert step.prefills == [a, b] and list(sim.scheduler.waiting) == [c]
    step = sim.step()
    assert step.decodes == [a, b] and step.prefills == [c]


def test_requests_that_could_outgrow_one_step_are_rejected_up_front() -> None:
    """A preempted request is re-prefilled with prompt + generated tokens in one step, so a request
    whose tokens (all but the last) could exceed max_batch_tokens would stall the queue later."""
    sim = Simulation(num_blocks=6, block_size=2, max_batch_tokens=6, model=fake_token_no_eos)
    with pytest.raises(ValueError, match=re.escape("may need 9 tokens in one step")):
        sim.scheduler.add(make_request(Spec((4, 5, 6, 7, 8), (), 5)))  # 5-token prompt, 10 tokens in all
    old = make_request(Spec((1,), (), 6))  # 7 tokens in all: 6 computed at most
    new = make_request(Spec((4, 5, 6, 7), (), 3))
    sim.scheduler.add(old)
    sim.scheduler.add(new)
    for _ in range(100):
        if not sim.scheduler.num_unfinished:
            break
        sim.step()
    assert not sim.scheduler.num_unfinished and old.finished and new.finished


# ---------------------------------------------------------------------------------------------
# Scheduler.add validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "block_size", "num_blocks", "max_batch_tokens", "needed"),
    [
        (9, 1, 4, 100, 8, 3),  # more prompt tokens than one step holds
        (4, 14, 4, 4, 100, 5),  # 17 computed tokens need 5 blocks of 4; only 4 exist
        (1, 41, 1, 40, 8, 41),  # 41 computed tokens need 41 blocks of 1; 40 exist (and the step holds 8)
        (20, 4, 2, 8, 10, 12),  # both limits exceeded (23 tokens, 12 blocks)
    ],
)
def test_add_rejects_requests_that_can_never_fit(
    prompt_len: int, max_new: int, block_size: int, num_blocks: int, max_batch_tokens: int, needed: int
) -> None:
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_batch_tokens)
    request = make_request(Spec(tuple(range(prompt_len)), (), max_new))
    message = (
        f"may need {prompt_len + max_new - 1} tokens in one step / {needed} KV blocks; "
        f"the engine allows {max_batch_tokens} "
        f"tokens per step and has {num_blocks} blocks"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        scheduler.add(request)
    assert scheduler.num_unfinished == 0


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "block_size", "num_blocks", "max_batch_tokens"),
    [
        (8, 1, 4, 2, 8),  # prompt exactly the step budget; 8 computed tokens exactly 2 blocks
        (4, 13, 4, 4, 100),  # 17 tokens, 16 computed: exactly 4 blocks
        (1, 1, 1, 2, 1),
    ],
)
def test_add_accepts_requests_at_the_limits(
    prompt_len: int, max_new: int, block_size: int, num_blocks: int, max_batch_tokens: int
) -> None:
    sim = Simulation(num_blocks, block_size, max_batch_tokens)
    (request,) = sim.run([Spec(tuple(range(prompt_len)), (), max_new)])
    assert request.finished and request.finish_reason in ("stop", "length")
