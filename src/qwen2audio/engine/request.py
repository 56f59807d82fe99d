"""Sampling parameters, a request's state machine, and what the engine reports back.

Owns per-request state only (tokens, blocks, status, stop checks); it must not run the model.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qwen2audio.engine.kv_cache import BlockTable
from qwen2audio.errors import InputError
from qwen2audio.processor import Prompt
from qwen2audio.text.tokenizer import IncrementalDetokenizer


class SamplingError(InputError):
    """A sampling parameter outside its range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; ``temperature`` 0 is greedy. Unset fields take the checkpoint's
    generation_config.json values (see :meth:`with_defaults`)."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """Fill unset fields from generation defaults, then validate."""
        filled = {name: defaults.get(name) for name in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                        "repetition_penalty") if getattr(self, name) is None}
        params = replace(self, **filled)
        params = replace(
            params,
            max_new_tokens=256 if params.max_new_tokens is None else params.max_new_tokens,
            temperature=0.0 if params.temperature is None else params.temperature,
            top_k=0 if params.top_k is None else params.top_k,
            top_p=1.0 if params.top_p is None else params.top_p,
            repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
            stop=(params.stop,) if isinstance(params.stop, str) else tuple(params.stop),
            stop_token_ids=tuple(params.stop_token_ids),
        )
        params.validate()
        return params

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.temperature is None or 0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    @property
    def greedy(self) -> bool:
        return not self.temperature


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: prompt, parameters, and everything that changes as it runs.

    ``num_computed`` counts tokens whose keys/values are in the cache; after a preemption it drops
    to zero and the prompt plus the tokens generated so far are recomputed in one prefill.
    """

    prompt: Prompt
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_total_tokens: int
    request_id: str = field(default_factory=lambda: Request.new_id())
    arrival: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    finish_reason: str | None = None
    error: str | None = None
    hash_cache: tuple[int, list[bytes]] | None = None  # (num_tokens, block hashes), see Engine._hashes

    @staticmethod
    def new_id() -> str:
        return f"req-{next(_ids)}"

    @property
    def all_ids(self) -> list[int]:
        return self.prompt.token_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt.token_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def length_reached(self, pending: int = 0) -> bool:
        """Whether the reply is at its length limit (max_new_tokens or the context), counting
        ``pending`` tokens sampled but not appended yet."""
        return (len(self.output_ids) + pending >= self.params.max_new_tokens
                or self.num_tokens + pending >= self.max_total_tokens)

    def append(self, token: int) -> str:
        """Record a sampled token; return the newly releasable text and settle the finish reason."""
        self.output_ids.append(token)
        params = self.params
        can_stop = len(self.output_ids) >= params.min_new_tokens
        if can_stop and (token in self.eos_ids or token in params.stop_token_ids):
            self.finish_reason = "stop"
            return self.detokenizer.finish()
        delta = self.detokenizer.add(token)
        if self.detokenizer.stopped_on is not None:
            self.finish_reason = "stop"
        elif self.length_reached():
            self.finish_reason = "length"
            delta += self.detokenizer.finish()
        return delta


@dataclass
class RequestOutput:
    """What one step produced for one request: a text delta, the new token ids, and at the end the
    finish reason and usage."""

    request_id: str
    delta: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    hash_cache: tuple[int, list[bytes]] | None = None  # (num_tokens, block hashes), see Engine._hashes
