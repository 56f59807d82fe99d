"""Shared fixtures: test data paths and the transformers oracle (a test-only dependency)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in its interpreter; the flag is read when triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = pathlib.Path(__file__).parent / "data"
_COMPILE_CHECK: dict[str, subprocess.Popen] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """With the kernels interpreted in this process, their sm_90 compile checks must run in a child
    without the interpreter (test_kernels.py waits for it). When that test is selected the child
    starts now, so its ptxas runs on the core this mostly single-threaded suite leaves idle instead
    of adding its seconds in sequence."""
    wanted = any(item.name == "test_every_kernel_compiles_for_sm90" for item in session.items)
    if not wanted or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    here = pathlib.Path(__file__).parent
    _COMPILE_CHECK["process"] = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(here / "test_kernels_compile.py"), "-o", "addopts=", "-q", "-p",
         "no:cacheprovider"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TRITON_INTERPRET": "0"},
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    process = _COMPILE_CHECK.pop("process", None)
    if process is not None and process.poll() is None:
        process.kill()


@pytest.fixture(scope="session")
def compile_check() -> subprocess.Popen | None:
    """The child that compiles every kernel for sm_90 (None without the interpreter)."""
    return _COMPILE_CHECK.get("process")


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
