"""Find a checkpoint directory: a local path, or a Hugging Face hub id fetched with huggingface_hub.

Owns the download and its offline error message; it must not parse what it finds.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from qwen2audio.errors import AdapterError, CheckpointError

PROCESSOR_FILES = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]


class CheckpointNotFoundError(CheckpointError):
    """Neither a local directory nor a reachable hub repository."""


def resolve_checkpoint(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None) -> pathlib.Path:
    """Return a local directory holding the checkpoint, downloading from the hub when needed.

    ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are honoured by huggingface_hub itself.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointNotFoundError(
            f"{text}: no such checkpoint directory (and not a hub id like 'Qwen/Qwen2-Audio-7B')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return pathlib.Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{text}: not in the local Hugging Face cache and the hub cannot be reached (offline?). "
            f"Download it where you are online (hf download {text} --local-dir DIR) "
            f"and pass that directory instead."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"{text}: no such repository on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointNotFoundError(f"{text}: download failed ({exc}); pass a local directory instead") from None


def resolve_adapter(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A LoRA adapter's local directory, downloading its two PEFT files when given a hub id."""
    try:
        return resolve_checkpoint(name_or_path, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
    except ValueError as exc:  # not found, offline, or a name the hub refuses
        raise AdapterError(str(exc).replace("checkpoint", "adapter")) from None


def checkpoint_identity(name_or_path: str | os.PathLike, directory: pathlib.Path | None = None,
                        quantization: str | None = None) -> str:
    """A label for what a checkpoint is, cheap enough to take before its weights load: the hub id
    (or the directory's absolute path), a digest of its config.json, and the quantization asked
    for when loading (e.g. "int4-g128"). Saved evaluation results are keyed on it."""
    path = pathlib.Path(name_or_path).expanduser()
    label = str(path.resolve()) if path.is_dir() else str(name_or_path)
    directory = directory or resolve_checkpoint(name_or_path, allow_patterns=["config.json"])
    try:
        digest = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise CheckpointError(f"{name_or_path}: cannot read config.json ({exc})") from None
    return f"{label}#{digest}" + (f"#{quantization}" if quantization else "")
