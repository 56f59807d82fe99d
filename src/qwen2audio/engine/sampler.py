"""Pick the next token for every sequence of a step at once.

Owns repetition penalty, min-new-tokens masking, temperature, top-k, top-p, greedy and seeded
sampling, and logprobs, in transformers' order. Seeded rows draw their noise from their own
generator (seed, then one draw per generated token), so their tokens do not depend on what else
is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        raw = logits
        logits = self._penalize(logits.clone(), requests)
        flags = [r.params.greedy for r in requests]
        tokens = logits.argmax(dim=-1)  # [S]
        if not all(flags):
            greedy = torch.tensor(flags, device=logits.device)
            tokens = torch.where(greedy, tokens, self._sample(logits, requests))
        token_list = tokens.tolist()  # the step's one device-to-host copy
        return SampleResult(token_list, self._logprobs(raw, token_list, requests))

    def _penalize(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        if rows:
            # transformers' RepetitionPenaltyLogitsProcessor: over prompt and output ids alike.
            seen = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool, device=logits.device)
            for k, i in enumerate(rows):
                ids = torch.tensor(requests[i].all_ids, device=logits.device)
                seen[k, ids[ids < logits.shape[-1]]] = True
            penalty = torch.tensor([requests[i].params.repetition_penalty for i in rows], device=logits.device)
            sub = logits[rows]
            scaled = torch.where(sub > 0, sub / penalty[:, None], sub * penalty[:, None])
            logits[rows] = torch.where(seen, scaled, sub)
        banned = [(i, t) for i, request in enumerate(requests)
                  if len(request.output_ids) < request.params.min_new_tokens
                  for t in (*request.eos_ids, *request.params.stop_token_ids) if t < logits.shape[-1]]
        if banned:  # one indexing op for the whole batch, not one per request
            rows, cols = torch.tensor(banned, device=logits.device).T
            logits[rows, cols] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature or 1.0 for r in requests], device=logits.device)
        logits = logits / temperature[:, None]
        logits = _top_k_top_p(logits, [r.params.top_k for r in requests], [r.params.top_p for r in requests])
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one noise row per request.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.params.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_(
                generator=self._shared
            )
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


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask what top-k (0 = off) and top-p (1 = off) drop, as transformers' warpers do."""
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending
    k = torch.tensor([vocab if kk <= 0 else min(kk, vocab) for kk in top_k], device=logits.device)
    kth = sorted_logits.gather(-1, (vocab - k)[:, None])  # the k-th largest value per row
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    p = torch.tensor(top_p, device=logits.device)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
