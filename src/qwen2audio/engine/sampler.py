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

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """logits [S, vocab] (float32), one row per request -> one token per request."""
        token_list = self.sample_on_device(logits, requests).tolist()  # the step's one device-to-host copy
        return SampleResult(token_list, self._logprobs(logits, token_list, requests))

    def sample_on_device(self, logits: torch.Tensor, requests: Sequence[Request], lag: int = 0) -> torch.Tensor:
        """Tokens [S] on the logits' device, with no host synchronisation. ``lag``: tokens each request
        has sampled that its host state does not show yet (a pipelined step), for min_new_tokens."""
        logits = self._penalize(logits.clone(), requests, lag)
        flags = [r.params.greedy for r in requests]
        tokens = logits.argmax(dim=-1)  # [S]
        if not all(flags):
            greedy = self.to_device(flags, torch.bool)
            tokens = torch.where(greedy, tokens, self._sample(logits, requests))
        return tokens

    def to_device(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        """A small tensor on the device; through pinned memory on a GPU, so the copy does not wait
        for the work already queued (a copy from pageable memory synchronises the stream)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _penalize(self, logits: torch.Tensor, requests: Sequence[Request], lag: int = 0) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        if rows:
            # transformers' RepetitionPenaltyLogitsProcessor: over prompt and output ids alike.
            seen = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool, device=logits.device)
            for k, i in enumerate(rows):
                ids = self.to_device(requests[i].all_ids, torch.long)
                seen[k, ids[ids < logits.shape[-1]]] = True
            index = self.to_device(rows, torch.long)
            penalty = self.to_device([requests[i].params.repetition_penalty for i in rows], torch.float32)
            sub = logits.index_select(0, index)
            scaled = torch.where(sub > 0, sub / penalty[:, None], sub * penalty[:, None])
            logits.index_copy_(0, index, torch.where(seen, scaled, sub))
        banned = [(i, t) for i, request in enumerate(requests)
                  if len(request.output_ids) + lag < request.params.min_new_tokens
                  for t in (*request.eos_ids, *request.params.stop_token_ids) if t < logits.shape[-1]]
        if banned:  # one indexing op for the whole batch, not one per request
            rows_t, cols_t = self.to_device(banned, torch.long).T
            logits[rows_t, cols_t] = float("-inf")
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
