"""Continuous batching over a paged KV cache: requests, scheduler, block manager, runner, sampler."""
