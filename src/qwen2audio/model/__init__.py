"""The network: audio encoder, projector and Qwen2 decoder, and strict checkpoint loading."""

from __future__ import annotations

import importlib.util
import os

import torch


def kernels_available(device: torch.device) -> bool:
    """Whether model/kernels.py can run on ``device`` (checked without importing triton): CUDA with
    Triton installed, or the CPU in Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
