"""What the engine is given (Prompt, SamplingParams), a request's state, and what it reports back.

Owns per-request state only (tokens, blocks, status, stop checks, block hashes); it must not run
the model or decide scheduling. Front ends build Prompts (through the Processor) and import them
from here, so the engine never imports the front ends.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qwen2audio.config import GenerationConfig
from qwen2audio.engine.block_manager import BlockTable, block_hashes, token_keys
from qwen2audio.errors import InputError
from qwen2audio.text.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    import numpy as np

    from qwen2audio.audio.segment import Window
    from qwen2audio.model.lora import Loaded


MAX_TEMPERATURE = 2.0  # OpenAI's; the one limit for the API, the CLI, the server and the web page


class SamplingError(InputError):
    """A sampling parameter outside its range."""


@dataclass(frozen=True)
class AudioSpan:
    """One audio inside a prompt: its tokens, its feature windows, and a content digest.

    ``offset`` indexes the row's unpadded ``token_ids``; ``first_window`` indexes the batch's
    ``input_features``. The digest keys the encoder cache and the prefix cache, since every
    placeholder token has the same id whatever the audio.
    """

    offset: int
    length: int
    first_window: int
    num_windows: int
    digest: str


@dataclass
class Prompt:
    """One prepared row: token ids, and the decoded audio (16 kHz samples) its placeholders stand for."""

    token_ids: list[int]
    audios: list[np.ndarray]
    offsets: list[int]
    digests: list[str]
    lengths: list[int]  # audio tokens of each clip
    windows: list[list[Window]] = field(default_factory=list)  # where each clip is cut for the encoder
    adapter: str | None = None  # the LoRA adapter (by its loaded name) that answers; None: the base model

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def spans(self) -> list[tuple[int, int, str]]:
        """(offset, length, digest) of each clip, as the prefix cache keys them."""
        return list(zip(self.offsets, self.lengths, self.digests, strict=True))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; ``temperature`` 0 is greedy. Checked when built, so a bad value fails
    where the caller made it. Unset fields take the checkpoint's generation_config.json values
    (see :meth:`with_defaults`)."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # ... and this times the number of times it was generated
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = ()  # token id -> added to its logit
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(bias))
        self._validate()

    def with_defaults(self, generation: GenerationConfig) -> SamplingParams:
        """Unset fields from the checkpoint's generation defaults, then the engine's own."""
        filled = {name: value for name, value in generation.defaults().items() if getattr(self, name) is None}
        params = replace(self, **filled)
        return replace(
            params,
            max_new_tokens=256 if params.max_new_tokens is None else params.max_new_tokens,
            temperature=0.0 if params.temperature is None else params.temperature,
            top_k=0 if params.top_k is None else params.top_k,
            top_p=1.0 if params.top_p is None else params.top_p,
            repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        )

    def _validate(self) -> None:
        checks = [
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.temperature is None or 0.0 <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be in [0, {MAX_TEMPERATURE:g}]"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
             "logit_bias maps token ids (>= 0) to values in [-100, 100]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
             "seed must be an integer in [-2**63, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs how often each token was generated (presence/frequency penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty)


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
    adapter: Loaded | None = None  # the LoRA adapter's slot, held while the request lives
    _hashes: tuple[int, list[bytes]] | None = field(default=None, repr=False)  # (num_tokens, hashes)

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

    def block_hashes(self, block_size: int) -> list[bytes]:
        """Chained hashes of its full blocks (audio keyed by clip digest), kept until it grows (asked every step)."""
        if self._hashes is None or self._hashes[0] != self.num_tokens:
            seed = self.adapter.key.encode() if self.adapter is not None else b""  # an adapter's keys differ
            hashes = block_hashes(token_keys(self.all_ids, self.prompt.spans), block_size, seed)
            self._hashes = (self.num_tokens, hashes)
        return self._hashes[1]

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

    def report(self, delta: str = "", tokens: Sequence[int] = (), logprobs: Sequence[dict] = ()) -> RequestOutput:
        """What this step produced for the request, with usage and, at the end, the finish reason."""
        return RequestOutput(
            self.request_id, delta, list(tokens), self.finish_reason is not None, self.finish_reason,
            prompt_tokens=self.prompt.num_tokens, completion_tokens=len(self.output_ids),
            logprobs=list(logprobs), error=self.error,
        )


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
