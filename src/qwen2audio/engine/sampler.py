"""Pick the next token for every sequence of a step at once.

Owns repetition penalty, min-new-tokens masking, temperature, top-k, top-p, greedy and seeded
sampling, and logprobs, in transformers' order. Seeded rows draw their noise from their own
generator (seed, then one draw per generated token), so their tokens do not depend on what else
is in the batch. Small per-step tensors reach the GPU through pinned memory, and
:meth:`Sampler.sample_on_device` leaves the tokens there, so a pipelined decode step need not wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwen2audio.engine.request import Request


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[dict | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._shared = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._seen = _TokenRows(device, counts=False)  # repetition penalty: prompt and output ids
        self._counts = _TokenRows(device, counts=True)  # presence/frequency penalties: output counts

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._seen.release(request_id)
        self._counts.release(request_id)

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """logits [S, vocab] (float32), one row per request -> one token per request."""
        token_list = self.sample_on_device(logits, requests).tolist()  # the step's one device-to-host copy
        return SampleResult(token_list, self._logprobs(logits, token_list, requests))

    def sample_on_device(self, logits: torch.Tensor, requests: Sequence[Request], lag: int = 0) -> torch.Tensor:
        """Tokens [S] on the logits' device, with no host synchronisation. ``lag``: tokens each request
        has sampled that its host state does not show yet (a pipelined step), for min_new_tokens."""
        penalized = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        rows = self.to_device(penalized, torch.long) if penalized else None
        slots = self._seen.slots([requests[i] for i in penalized], logits.shape[-1], self.to_device)
        counted = [i for i, r in enumerate(requests) if r.params.counts_output]
        count_rows = self.to_device(counted, torch.long) if counted else None
        chosen = [requests[i] for i in counted]
        count_slots = self._counts.slots(chosen, logits.shape[-1], self.to_device)
        logits = self._penalize(logits.clone(), requests, rows, slots)
        logits = self._bias(logits, requests, lag, chosen, count_rows, count_slots)
        flags = [r.params.greedy for r in requests]
        tokens = logits.argmax(dim=-1)  # [S]
        if not all(flags):
            greedy = self.to_device(flags, torch.bool)
            tokens = torch.where(greedy, tokens, self._sample(logits, requests))
        # The new tokens count from the next step on, without the host.
        if rows is not None:
            self._seen.mark(slots, tokens.index_select(0, rows))
        if count_rows is not None:
            self._counts.mark(count_slots, tokens.index_select(0, count_rows))
        return tokens

    def to_device(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        """A small tensor on the device; through pinned memory on a GPU, so the copy does not wait
        for the work already queued (a copy from pageable memory synchronises the stream)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _penalize(
        self, logits: torch.Tensor, requests: Sequence[Request], rows: torch.Tensor | None, slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """transformers' RepetitionPenaltyLogitsProcessor, over prompt and output ids alike.
        ``rows`` [R]: the repetition-penalised rows; ``slots`` [R]: their seen-token rows."""
        if rows is not None:
            seen = self._seen.rows_of(slots)  # [R, vocab]
            penalty = self.to_device([r.params.repetition_penalty for r in requests
                                      if r.params.repetition_penalty != 1.0], torch.float32)
            sub = logits.index_select(0, rows)
            scaled = torch.where(sub > 0, sub / penalty[:, None], sub * penalty[:, None])
            logits.index_copy_(0, rows, torch.where(seen, scaled, sub))
        return logits

    def _bias(
        self, logits: torch.Tensor, requests: Sequence[Request], lag: int, chosen: Sequence[Request],
        rows: torch.Tensor | None, slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """OpenAI's presence and frequency penalties (``chosen`` the requests that have one, ``rows``
        [C] their rows, ``slots`` their output counts), then logit_bias, then the end tokens
        min_new_tokens still bans."""
        if rows is not None:
            counts = self._counts.rows_of(slots)  # [C, vocab]
            presence = self.to_device([r.params.presence_penalty for r in chosen], torch.float32)
            frequency = self.to_device([r.params.frequency_penalty for r in chosen], torch.float32)
            sub = logits.index_select(0, rows) - frequency[:, None] * counts - presence[:, None] * (counts > 0)
            logits.index_copy_(0, rows, sub)
        vocab = logits.shape[-1]
        bias = [(i * vocab + t, b) for i, request in enumerate(requests) for t, b in request.params.logit_bias
                if t < vocab]
        if bias:
            positions, values = zip(*bias, strict=True)
            logits.view(-1).index_add_(0, self.to_device(positions, torch.long), self.to_device(values, logits.dtype))
        banned = [i * vocab + t for i, request in enumerate(requests)
                  if len(request.output_ids) + lag < request.params.min_new_tokens
                  for t in (*request.eos_ids, *request.params.stop_token_ids) if t < vocab]
        if banned:  # one op for the whole batch; a fill with a Python number needs no copy to the device
            logits.view(-1).index_fill_(0, self.to_device(banned, torch.long), float("-inf"))
        return logits

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        temperature = self.to_device([r.params.temperature or 1.0 for r in requests], torch.float32)
        logits = logits / temperature[:, None]
        logits = _top_k_top_p(logits, [r.params.top_k for r in requests], [r.params.top_p for r in requests],
                              self.to_device)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one noise row per request.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.params.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_(
                generator=self._shared
            )
            noise.index_copy_(0, self.to_device(unseeded, torch.long), draws)
        for i, request in enumerate(requests):
            if request.params.seed is not None:
                noise[i].exponential_(generator=self._generator(request))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            # Kept until the request finishes, so a preempted request resumes its stream.
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self._generators[request.request_id] = generator
        return generator

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: list[int], requests: Sequence[Request]) -> list[dict | None]:
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        result: list[dict | None] = [None] * len(requests)
        if not rows:
            return result
        logprobs = raw[rows].log_softmax(dim=-1)
        width = max(requests[i].params.logprobs for i in rows)
        top_values, top_ids = logprobs.topk(max(width, 1), dim=-1)
        chosen = logprobs[torch.arange(len(rows)), torch.tensor([tokens[i] for i in rows])].tolist()
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for k, i in enumerate(rows):
            n = requests[i].params.logprobs
            result[i] = {"token_id": tokens[i], "logprob": chosen[k],
                         "top": list(zip(top_ids[k][:n], top_values[k][:n], strict=True))}
        return result


class _TokenRows:
    """A row over the vocabulary per request, kept on the device: filled from the request's ids
    once, then updated with each sampled token on the device, so a pipelined step's penalty already
    counts the token the host has not read yet. ``counts`` False: which ids the prompt and output
    hold (repetition penalty); True: how often each was generated (presence/frequency penalties)."""

    def __init__(self, device: torch.device, counts: bool) -> None:
        self.device = device
        self.counts = counts
        self.dtype = torch.float32 if counts else torch.bool
        self.rows = torch.zeros(0, 0, dtype=self.dtype, device=device)  # [capacity, vocab]
        self.slot_of: dict[str, int] = {}
        self.free: list[int] = []

    def slots(
        self, requests: Sequence[Request], vocab: int, to_device: Callable[[Sequence, torch.dtype], torch.Tensor]
    ) -> torch.Tensor | None:
        """Row index [R] of each request (rows of new requests filled from their ids)."""
        if not requests:
            return None
        if self.rows.shape[1] != vocab:
            self.rows = torch.zeros(0, vocab, dtype=self.dtype, device=self.device)
            self.slot_of, self.free = {}, []
        for request in requests:
            if request.request_id not in self.slot_of:
                slot = self._take()
                ids = [t for t in (request.output_ids if self.counts else request.all_ids) if 0 <= t < vocab]
                self.rows[slot].zero_()
                if ids:
                    self._add(self.rows[slot], to_device(ids, torch.long))
                self.slot_of[request.request_id] = slot
        return to_device([self.slot_of[r.request_id] for r in requests], torch.long)

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        return self.rows.index_select(0, slots)

    def mark(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        self._add(self.rows.view(-1), slots * self.rows.shape[1] + tokens)

    def _add(self, flat: torch.Tensor, positions: torch.Tensor) -> None:
        if self.counts:  # repeated positions add up
            flat.index_add_(0, positions, torch.ones(positions.shape, dtype=self.dtype, device=flat.device))
        else:
            flat.index_fill_(0, positions, True)

    def release(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)

    def _take(self) -> int:
        if not self.free:
            old = self.rows.shape[0]
            grown = torch.zeros(max(8, 2 * old), self.rows.shape[1], dtype=self.dtype, device=self.device)
            grown[:old] = self.rows
            self.rows = grown
            self.free = list(range(grown.shape[0] - 1, old - 1, -1))
        return self.free.pop()


def _top_k_top_p(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], tensor: Callable[[Sequence, torch.dtype], torch.Tensor]
) -> torch.Tensor:
    """Mask what top-k (0 = off) and top-p (1 = off) drop, as transformers' warpers do."""
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending
    k = tensor([vocab if kk <= 0 else min(kk, vocab) for kk in top_k], torch.long)
    kth = sorted_logits.gather(-1, (vocab - k)[:, None])  # the k-th largest value per row
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    p = tensor(top_p, torch.float32)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
