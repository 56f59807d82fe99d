"""Pipelined decoding: a decode step is launched before the previous one is read.

Owns the one step in flight. Step n+1 is launched with step n's sampled tokens still on the
device, then step n is read, so the host's bookkeeping (detokenizing, stop checks, scheduling)
overlaps the GPU's work and the decode loop never waits on the device except for tokens a step
already finished. Outputs arrive one engine step later. It uses the runner's static decoder and
the sampler's on-device path; everything it learns goes through the scheduler's update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwen2audio.engine.request import Request, RequestOutput
from qwen2audio.engine.runner import ModelRunner
from qwen2audio.engine.sampler import Sampler
from qwen2audio.engine.scheduler import ScheduledStep, Scheduler

logger = logging.getLogger(__name__)


@dataclass
class Inflight:
    """A decode step launched but not read yet."""

    requests: list[Request]
    tokens: torch.Tensor  # [S] sampled, on the device
    host: torch.Tensor  # [S] the host buffer its tokens are copied to (pinned on a GPU)
    done: torch.cuda.Event | None  # recorded after that copy (None on the CPU, where copies are synchronous)


class DecodePipeline:
    def __init__(self, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler, enabled: bool) -> None:
        self.runner, self.sampler, self.scheduler = runner, sampler, scheduler
        self.enabled = enabled and runner.static is not None
        self.inflight: Inflight | None = None

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def start(self, step: ScheduledStep) -> list[RequestOutput] | None:
        """Launch a decode-only step and leave it running: [] once launched, the failed requests'
        outputs if it broke after sampling, None if it cannot run ahead or its model step failed
        before sampling (nothing has changed then; run it the plain way)."""
        if step.prefills or not self._pipelinable(step.decodes):
            return None
        try:
            self.inflight = self._launch(step.decodes, ahead=0, tokens=None)
        except Exception as exc:  # after sampling: redoing the step would skew seeds and penalties
            logger.exception("pipelined decode step failed after sampling")
            return [self.scheduler.fail(r, f"{type(exc).__name__}: {exc}") for r in step.decodes]
        return None if self.inflight is None else []

    def advance(self) -> list[RequestOutput]:
        """Launch the step after the one in flight (if it can run ahead), then read the one in flight."""
        current, self.inflight = self.inflight, None
        following = [r for r in current.requests if self._continues(r)]
        failed: Exception | None = None
        # Reserved first: the admission check must see the blocks these decodes take.
        if (following and self._pipelinable(following) and self.scheduler.reserve_next(following)
                and not self.scheduler.can_admit(len(following))):
            try:
                self.inflight = self._launch(following, ahead=1, tokens=self._rows_of(current, following))
            except Exception as exc:  # after sampling: see start()
                logger.exception("pipelined decode step failed after sampling")
                failed = exc
        outputs = self._collect(current)
        if failed is not None:
            outputs += [self.scheduler.fail(r, f"{type(failed).__name__}: {failed}") for r in following
                        if self.scheduler.live(r)]
        return outputs

    def _pipelinable(self, requests: list[Request]) -> bool:
        """Decode steps through the static decoder can run ahead, unless a request wants logprobs
        (they are read on the host every step)."""
        static = self.runner.static
        return (self.enabled and bool(requests) and static.bucket(len(requests)) is not None
                and all(r.params.logprobs is None for r in requests))

    def _continues(self, request: Request) -> bool:
        """Still running after the token in flight, unless that token is an end token or a stop string."""
        return (self.scheduler.live(request) and request.finish_reason is None
                and not request.length_reached(pending=1))

    def _rows_of(self, current: Inflight, following: list[Request]) -> torch.Tensor:
        """The in-flight tokens of the requests that continue, in their order, still on the device."""
        if len(following) == len(current.requests):
            return current.tokens
        rows = {id(r): k for k, r in enumerate(current.requests)}
        return current.tokens.index_select(0, self.sampler.to_device([rows[id(r)] for r in following], torch.long))

    def _launch(self, requests: list[Request], ahead: int, tokens: torch.Tensor | None) -> Inflight | None:
        """Run a decode step and sample it, leaving the tokens on the device. None if the model step
        failed, when nothing has changed and the plain path can run it; a failure after sampling
        (which moves seeded generators and penalty state) raises."""
        static = self.runner.static
        try:
            logits = static.execute(requests, ahead, tokens)
        except Exception:
            logger.exception("pipelined decode step failed; running it the plain way")
            return None
        sampled = self.sampler.sample_on_device(logits, requests, lag=ahead)
        return Inflight(list(requests), sampled, *static.read_back(sampled))

    def _collect(self, step: Inflight) -> list[RequestOutput]:
        if step.done is not None:
            step.done.synchronize()
        tokens = step.host.tolist()
        return self.scheduler.update(step.requests, tokens, [None] * len(tokens), num_prefills=0)
