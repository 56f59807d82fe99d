"""Shared fixtures: test data paths and the transformers oracle (a test-only dependency)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in its interpreter; the flag is read when triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    """The tiny random checkpoint (GQA, seed 1) most suites use, built once per session; read-only."""
    from checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def whisper_oracle():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=128)
