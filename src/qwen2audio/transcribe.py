"""Transcription and translation of whole files: 30 s windows, batched, with clean text.

Owns the task prompts, cutting long audio into windows (each window one request, so each gets a
timestamp), stripping the chatter chat models add around a transcript, and txt/json/srt/vtt
output. Used by `qwen2audio transcribe` and by the server's /v1/audio endpoints.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from qwen2audio.audio.features import split_windows
from qwen2audio.audio.io import load_audio
from qwen2audio.errors import InputError
from qwen2audio.text.prompt import AUDIO_PLACEHOLDER

WINDOW_TOKENS = 448  # most tokens a 30 s window's transcript may take (Whisper's limit)
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mp4", ".mka", ".wma"}
LANGUAGES = {"en": "English", "zh": "Chinese", "yue": "Cantonese", "fr": "French", "de": "German",
             "es": "Spanish", "it": "Italian", "ja": "Japanese", "ko": "Korean", "ru": "Russian",
             "pt": "Portuguese", "ar": "Arabic", "nl": "Dutch"}
# What chat models wrap a transcript in ("The original content of this audio is: '...'").
_CHATTER = re.compile(
    r"^\s*(?:the\s+)?(?:original\s+content|transcription|transcript|speech|text)(?:\s+of\s+(?:this|the)\s+"
    r"(?:audio|speech|recording|clip))?\s*(?:is|reads|says)?\s*[:：]\s*",
    re.IGNORECASE,
)
_LANGUAGE_TAG = re.compile(r"<\|[a-z]{2,3}\|>")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」"}


def collect_files(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Files as given, and the audio files (by extension) directly inside given directories."""
    files: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise InputError(f"{path}: no audio files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def clean_transcript(text: str) -> str:
    """Strip language tags, a leading "The original content of this audio is:" and wrapping quotes."""
    text = _LANGUAGE_TAG.sub("", text).strip()
    text = _CHATTER.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    path: str
    segments: list[Segment] = field(default_factory=list)
    language: str | None = None
    task: str = "transcribe"

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()

    def render(self, fmt: str) -> str:
        if fmt == "txt":
            return self.text + "\n"
        if fmt == "json":
            return json.dumps({"file": self.path, "task": self.task, "language": self.language, "text": self.text,
                               "segments": [vars(s) for s in self.segments]}, ensure_ascii=False, indent=2) + "\n"
        if fmt in ("srt", "vtt"):
            return _subtitles(self.segments, fmt)
        raise InputError(f"unknown format {fmt!r} (txt, json, srt, vtt)")


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(segments: Sequence[Segment], fmt: str) -> str:
    separator = "," if fmt == "srt" else "."
    blocks = []
    for index, segment in enumerate((s for s in segments if s.text), start=1):
        times = f"{_timestamp(segment.start, separator)} --> {_timestamp(segment.end, separator)}"
        blocks.append(f"{index}\n{times}\n{segment.text}\n" if fmt == "srt" else f"{times}\n{segment.text}\n")
    body = "\n".join(blocks)
    return body if fmt == "srt" else "WEBVTT\n\n" + body


class Transcriber:
    """Runs every window of every file through the engine at once (continuous batching)."""

    def __init__(self, model: Any, language: str | None = None, task: str = "transcribe",
                 max_new_tokens: int = WINDOW_TOKENS, chat: bool | None = None) -> None:
        if task not in ("transcribe", "translate"):
            raise InputError(f"task must be transcribe or translate, not {task!r}")
        if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
            raise InputError(f"language must be a code like en, zh or yue, not {language!r}")
        self.model = model
        self.language = language
        self.task = task
        self.max_new_tokens = max_new_tokens
        # Base checkpoints ship no chat template and expect the paper's task prompts.
        self.chat = model.processor.chat_template.has_checkpoint_template if chat is None else chat

    def prompt(self) -> str | list[dict[str, Any]]:
        if not self.chat:
            if self.task == "translate":
                return f"{AUDIO_PLACEHOLDER}Translate the speech into English:"
            tag = f"<|{self.language}|>" if self.language else ""
            return f"{AUDIO_PLACEHOLDER}Detect the language and recognize the speech: {tag}"
        spoken = f" The speech is in {LANGUAGES.get(self.language, self.language)}." if self.language else ""
        if self.task == "translate":
            instruction = f"Translate the speech into English.{spoken} Reply with the translation only."
        else:
            instruction = (f"Transcribe the speech verbatim.{spoken} Reply with the transcript only, "
                           "without quotes or any other words.")
        return [{"role": "user", "content": [{"type": "audio", "audio": None}, {"type": "text", "text": instruction}]}]

    def plan(self, samples: Any, name: str) -> tuple[Transcript, list[tuple[Segment, Any]]]:
        """One prepared prompt per 30 s window of ``samples``, each with the segment it fills."""
        processor = self.model.processor
        window_seconds = processor.feature_extractor.config.chunk_length
        rate = processor.feature_extractor.config.sampling_rate
        transcript = Transcript(name, language=self.language, task=self.task)
        jobs = []
        for k, window in enumerate(split_windows(samples, processor.feature_extractor.config)):
            segment = Segment(k * window_seconds, min((k + 1) * window_seconds, len(samples) / rate), "")
            transcript.segments.append(segment)
            jobs.append((segment, processor.prepare(self._item(window), iter([window]))))
        return transcript, jobs

    def transcribe(self, files: Sequence[pathlib.Path | str], progress: bool = True) -> list[Transcript]:
        engine = self.model.engine
        params = self.params()
        transcripts, owners = [], {}
        for path in files:
            transcript, jobs = self.plan(load_audio(path), str(path))
            transcripts.append(transcript)
            for segment, prepared in jobs:
                owners[engine.add_request(prepared, params)] = (transcript, segment, [])
        remaining = {id(t): len(t.segments) for t in transcripts}  # by object: a file may be given twice
        with tqdm(total=len(transcripts), unit="file", desc="transcribing", disable=not progress) as bar:
            for output in engine.run(set(owners)):
                transcript, segment, parts = owners[output.request_id]
                parts.append(output.delta)
                if output.finished:
                    if output.error:
                        raise RuntimeError(f"{transcript.path}: {output.error}")
                    segment.text = clean_transcript("".join(parts))
                    remaining[id(transcript)] -= 1
                    if remaining[id(transcript)] == 0:
                        bar.update(1)
        return transcripts

    def _item(self, window: Any) -> str | list[dict[str, Any]]:
        item = self.prompt()
        if isinstance(item, list):
            item[0]["content"][0]["audio"] = window
        return item

    def params(self) -> Any:
        from qwen2audio.engine.request import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, repetition_penalty=1.0)
