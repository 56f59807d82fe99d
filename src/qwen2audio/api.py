"""The public model object: load a checkpoint, run the network on a processor Batch.

Owns device/dtype choice and the glue between Processor batches (left padded) and the model's
flattened token layout. Generation (engine) builds on this; front ends use only this API.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from qwen2audio.config import ModelConfig
from qwen2audio.errors import CheckpointError
from qwen2audio.hub import resolve_checkpoint
from qwen2audio.model.attention import AttentionMetadata
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwen2audio.model.weights import load_weights
from qwen2audio.processor import Batch, Processor

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" picks the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (the family overflows in fp16) and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


class Qwen2Audio:
    """A loaded Qwen2-Audio checkpoint with its processor."""

    def __init__(self, network: Qwen2AudioForConditionalGeneration, processor: Processor, directory: Any) -> None:
        self.network = network
        self.processor = processor
        self.config: ModelConfig = network.config
        self.directory = directory

    @property
    def device(self) -> torch.device:
        return self.network.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.language_model.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        **processor_options: Any,
    ) -> Qwen2Audio:
        """Load from a local directory or a Hugging Face hub id (downloaded with huggingface_hub).

        The network is built on the meta device, allocated once on ``device`` in ``dtype`` and
        filled tensor by tensor, so host memory peaks near one copy of the weights.
        """
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        directory = resolve_checkpoint(name_or_path, allow_patterns=WEIGHT_PATTERNS)
        config = ModelConfig.from_dir(directory)
        started = time.perf_counter()
        with torch.device("meta"):
            network = Qwen2AudioForConditionalGeneration(config)
        network = network.to(dtype=torch_dtype).to_empty(device=target)
        network.eval().requires_grad_(False)
        load_weights(network, directory, progress=progress)
        logger.info("loaded %s in %.1f s (%s, %s)", directory, time.perf_counter() - started, target, torch_dtype)
        processor = Processor.from_pretrained(directory, **processor_options)
        if processor.audio_id != config.audio_token_id:
            raise CheckpointError(
                f"{directory}: tokenizer's <|AUDIO|> id {processor.audio_id} != config's {config.audio_token_id}"
            )
        return cls(network, processor, directory)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) for a left-padded processor batch; pad positions are zero.

        Positions count from each row's first real token, as the reference's generate does.
        """
        device = self.device
        lengths = [len(ids) for ids in batch.token_ids]
        input_ids = torch.tensor([t for ids in batch.token_ids for t in ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        audio = None
        if batch.window_tokens:
            audio = self.network.encode_audio(
                batch.input_features.to(device), batch.feature_attention_mask.to(device), batch.window_tokens
            )
        hidden = self.network(input_ids, positions, AttentionMetadata.prefill(lengths), None, audio)
        flat = self.network.logits(hidden)  # [N, vocab]
        width = batch.input_ids.shape[1]
        out = torch.zeros(len(lengths), width, flat.shape[-1], dtype=flat.dtype, device=device)
        start = 0
        for row, n in enumerate(lengths):
            out[row, width - n:] = flat[start:start + n]
            start += n
        return out
