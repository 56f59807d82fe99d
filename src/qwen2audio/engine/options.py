"""The engine's knobs: capacity, caches, and the speed switches of the GPU path.

Plain data, read once when an engine (or, for the backend fields, a model) is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineOptions:
    """Capacity knobs; None picks from the device (see runner.default_kv_budget).

    ``kernels`` and ``cpu_onednn`` choose the decoder's backend, which is bound to the network when
    it is loaded (``Qwen2Audio.from_pretrained`` reads them); an engine only checks that its
    network was built that way.

    ``compile_decode`` (CPU) runs decode steps through one torch.compile'd graph of the decoder:
    faster decoding (the eager step's small ops cost milliseconds a token) for a one-time compile
    of tens of seconds per batch-size class (one sequence; 2-16), when first needed. It needs a C++
    compiler; the linear layers stay plain torch ones (no oneDNN conversion).

    ``max_loras`` > 0 gives the engine that many LoRA adapter slots of rank up to
    ``max_lora_rank`` (model/lora.py), so requests for several adapters and the base model share
    batches; their buffers are made for every linear layer when the engine is built."""

    block_size: int = 16
    kv_cache_bytes: int | None = None
    max_batch_tokens: int = 16384
    max_running: int = 256
    max_model_len: int | None = None  # the longest prompt + reply (None: the model's max_position_embeddings)
    memory_fraction: float = 0.9  # GPU: the share of device memory weights, activations and KV cache may take
    enable_prefix_cache: bool = True
    encoder_cache_bytes: int = 512 * 2**20
    seed: int = 0
    cpu_onednn: bool = True  # oneDNN linear layers on the CPU (False: plain torch.nn.Linear)
    kernels: bool | None = None  # Triton kernels (None: on CUDA when triton is installed)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    static_decode: bool | None = None  # decode through fixed buffers (None: where CUDA graphs replay them)
    max_graph_batch: int = 128  # decode steps of up to this many sequences replay a CUDA graph
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8" (e4m3: half the KV bytes)
    async_decode: bool | None = None  # launch decode step n+1 before reading step n (None: with CUDA graphs)
    compile_decode: bool = False  # CPU: decode steps of up to 16 sequences through torch.compile (see below)
    max_loras: int = 0  # LoRA adapter slots (0: none until Engine.load_adapter makes some)
    max_lora_rank: int = 16  # the largest adapter rank the slots hold
