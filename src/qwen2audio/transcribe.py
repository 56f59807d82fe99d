"""Transcription and translation of whole files: windows cut in pauses, batched, with clean text.

Owns cutting long audio into windows (each window one request, so each gets a timestamp), the
instruction chat checkpoints get, stripping the chatter chat models add around a transcript, and
txt/json/srt/vtt output. One driver (:meth:`Transcriber.run`) serves `qwen2audio transcribe` and
the server's /v1/audio endpoints; the base model's task prompts live in text/tasks.py.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qwen2audio.api import Qwen2Audio
from qwen2audio.audio.io import load_audio
from qwen2audio.audio.segment import Segmentation, check_segmentation, no_speech_probability, plan_windows
from qwen2audio.config import SAMPLE_RATE
from qwen2audio.engine.async_engine import AsyncEngine
from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.errors import InputError
from qwen2audio.text.tasks import LANGUAGES, language_name, recognition_prompt, translation_prompt

WINDOW_TOKENS = 448  # most tokens a 30 s window's transcript may take (Whisper's limit)
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mp4", ".mka", ".wma"}
Generate = Callable[[Prompt, SamplingParams], AsyncIterator[RequestOutput]]
# What chat models wrap a transcript in ("The original content of this audio is: '...'").
_CHATTER = re.compile(
    r"^\s*(?:the\s+)?(?:original\s+content|transcription|transcript|speech|text)(?:\s+of\s+(?:this|the)\s+"
    r"(?:audio|speech|recording|clip))?\s*(?:is|reads|says)?\s*[:：]\s*",
    re.IGNORECASE,
)
_LANGUAGE_TAG = re.compile(r"<\|[a-z]{2,3}\|>")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」"}


def collect_files(inputs: Sequence[str], include: str | None = None) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(file, name to write its transcript under) for files as given and for the audio files found
    in given directories and their subfolders (by extension, or matching the ``include`` glob);
    a directory's files are named by their path inside it, so equal names in subfolders stay apart."""
    files: list[tuple[pathlib.Path, pathlib.Path]] = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            try:
                found = sorted(p for p in path.rglob(include or "*")
                               if p.is_file() and _wanted(p.relative_to(path), include))
            except (NotImplementedError, ValueError) as exc:  # e.g. an absolute pattern
                raise InputError(f"--include {include}: not a pattern inside a folder ({exc})") from None
            if not found:
                raise InputError(f"{path}: no {'files matching ' + repr(include) if include else 'audio files'} "
                                 f"in this directory or below")
            files.extend((p, p.relative_to(path)) for p in found)
        elif path.is_file():
            files.append((path, pathlib.Path(path.name)))
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def _wanted(relative: pathlib.Path, include: str | None) -> bool:
    if any(part.startswith(".") for part in relative.parts):  # hidden files and folders
        return False
    return include is not None or relative.suffix.lower() in AUDIO_EXTENSIONS


def clean_transcript(text: str) -> str:
    """Strip language tags, a leading "The original content of this audio is:" and wrapping quotes."""
    text = _LANGUAGE_TAG.sub("", text).strip()
    text = _CHATTER.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


@dataclass
class Segment:
    """One window's transcript with OpenAI's (Whisper's) segment statistics, computed honestly:
    ``tokens`` and ``avg_logprob`` from the generated tokens, ``compression_ratio`` from the text
    (zlib, as Whisper), ``no_speech_prob`` from the VAD."""

    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0

    @property
    def compression_ratio(self) -> float:
        data = self.text.encode("utf-8")
        return len(data) / len(zlib.compress(data)) if data else 0.0

    def openai(self, index: int) -> dict[str, Any]:
        """The segment as OpenAI's verbose_json has it (``seek``: its start in 10 ms frames)."""
        return {"id": index, "seek": round(self.start * 100), "start": self.start, "end": self.end,
                "text": self.text, "tokens": self.tokens, "temperature": self.temperature,
                "avg_logprob": self.avg_logprob, "compression_ratio": self.compression_ratio,
                "no_speech_prob": self.no_speech_prob}


@dataclass
class Transcript:
    path: str
    segments: list[Segment] = field(default_factory=list)
    language: str | None = None
    task: str = "transcribe"
    duration: float = 0.0  # seconds of audio
    error: str | None = None  # why this file could not be transcribed (the others went on)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()

    def render(self, fmt: str) -> str:
        if fmt == "txt":
            return self.text + "\n"
        if fmt == "json":
            return json.dumps({"file": self.path, "task": self.task, "language": self.language, "text": self.text,
                               "segments": [s.openai(i) for i, s in enumerate(self.segments)]},
                              ensure_ascii=False, indent=2) + "\n"
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
    """Plans one request per window (at most 30 s, cut in pauses unless ``segmentation`` is "fixed")
    and runs them all at once through the engine (continuous batching)."""

    def __init__(self, model: Qwen2Audio, language: str | None = None, task: str = "transcribe",
                 max_new_tokens: int = WINDOW_TOKENS, chat: bool | None = None,
                 segmentation: Segmentation = "vad", temperature: float = 0.0, details: bool = False,
                 context: str | None = None, adapter: str | None = None) -> None:
        if task not in ("transcribe", "translate"):
            raise InputError(f"task must be transcribe or translate, not {task!r}")
        if language is not None and language not in LANGUAGES:
            raise InputError(f"language {language!r} is not one this model knows: {', '.join(sorted(LANGUAGES))}")
        check_segmentation(segmentation)
        self.model = model
        self.language = language
        self.task = task
        self.segmentation = segmentation
        if not 0.0 <= temperature <= 1.0:
            raise InputError(f"temperature must be in [0, 1], not {temperature}")
        # ``details``: each token's logprob for avg_logprob (a logprob request skips pipelined decoding)
        # and the VAD's no_speech_prob, for the formats that show them.
        self.details = details
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, repetition_penalty=1.0,
                                     logprobs=0 if details else None)
        # Base checkpoints ship no chat template and expect the paper's task prompts.
        self.chat = model.processor.chat_template.has_checkpoint_template if chat is None else chat
        if context and not self.chat:
            raise InputError("a transcription prompt needs a chat checkpoint (the base model's task prompts take none)")
        self.context = context  # OpenAI's `prompt`: told to the model in the instruction
        self.adapter = adapter  # a loaded LoRA adapter's name: it answers every window

    def prompt(self) -> str | list[dict[str, Any]]:
        """The raw task prompt (base checkpoints) or a one-turn conversation with its audio part empty."""
        if not self.chat:
            return translation_prompt("en") if self.task == "translate" else recognition_prompt(self.language)
        spoken = f" The speech is in {language_name(self.language)}." if self.language else ""
        if self.task == "translate":
            instruction = f"Translate the speech into English.{spoken} Reply with the translation only."
        else:
            instruction = (f"Transcribe the speech verbatim.{spoken} Reply with the transcript only, "
                           "without quotes or any other words.")
        if self.context:
            instruction += f" Context (earlier words, names and terms to expect): {self.context}"
        return [{"role": "user", "content": [{"type": "audio", "audio": None}, {"type": "text", "text": instruction}]}]

    def plan(self, samples: np.ndarray, name: str) -> tuple[Transcript, list[Prompt]]:
        """A transcript with one empty segment per window of ``samples`` (none for stretches without
        speech), and each window's prompt."""
        processor = self.model.processor
        transcript = Transcript(name, language=self.language, task=self.task, duration=len(samples) / SAMPLE_RATE)
        prompts = []
        for window in plan_windows(samples, self.segmentation, processor.feature_extractor.config.chunk_length):
            clip = samples[window.start:window.end]
            no_speech = no_speech_probability(clip) if self.details else 0.0  # a second VAD pass: only if shown
            transcript.segments.append(Segment(*window.seconds, "", no_speech_prob=no_speech,
                                               temperature=self.params.temperature))
            prompts.append(replace(processor.prepare(self._item(clip), iter([clip])), adapter=self.adapter))
        return transcript, prompts

    async def run(self, transcript: Transcript, prompts: Sequence[Prompt], generate: Generate) -> Transcript:
        """The driver: every window's request at once through ``generate`` (an AsyncEngine's, or a
        server's that also counts metrics), each segment filled with its cleaned text."""
        async for _ in self.stream(transcript, prompts, generate):
            pass
        return transcript

    async def stream(self, transcript: Transcript, prompts: Sequence[Prompt], generate: Generate) -> AsyncIterator[str]:
        """Every window's request at once; each window's text as a delta once it and the windows
        before it are done, so the deltas joined are ``transcript.text``. Leaving early cancels the
        requests still running (which aborts them)."""
        tasks = [asyncio.ensure_future(self._fill(segment, generate, prompt, transcript.path))
                 for segment, prompt in zip(transcript.segments, prompts, strict=True)]
        try:
            said = False
            for segment, task in zip(transcript.segments, tasks, strict=True):
                await task
                if segment.text:
                    yield (" " if said else "") + segment.text
                    said = True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fill(self, segment: Segment, generate: Generate, prompt: Prompt, name: str) -> None:
        parts, logprobs = [], []
        async for output in generate(prompt, self.params):
            if output.error:
                raise RuntimeError(f"{name}: {output.error}")
            parts.append(output.delta)
            segment.tokens.extend(output.token_ids)
            logprobs.extend(entry["logprob"] for entry in output.logprobs)
        segment.text = clean_transcript("".join(parts))
        segment.avg_logprob = sum(logprobs) / len(logprobs) if logprobs else 0.0

    def transcribe(self, files: Sequence[pathlib.Path | str], progress: bool = True,
                   on_done: Callable[[Transcript], None] | None = None) -> list[Transcript]:
        """Every window of every file at once; ``on_done`` gets each transcript as its file completes.
        Files are decoded first; with several, one that cannot be comes back with ``error`` set and
        the others go on (a single file's error is raised)."""
        planned = [self._plan_file(path, keep_going=len(files) > 1) for path in files]
        engine = AsyncEngine(self.model.engine)
        try:
            return asyncio.run(self._run_all(planned, engine.generate, progress, on_done))
        finally:
            engine.shutdown()

    def _plan_file(self, path: pathlib.Path | str, keep_going: bool) -> tuple[Transcript, list[Prompt]]:
        try:
            return self.plan(load_audio(path), str(path))
        except InputError as exc:
            if not keep_going:
                raise
            return Transcript(str(path), language=self.language, task=self.task, error=str(exc)), []

    async def _run_all(self, planned: Sequence[tuple[Transcript, list[Prompt]]], generate: Generate,
                       progress: bool, on_done: Callable[[Transcript], None] | None) -> list[Transcript]:
        total = sum(transcript.duration for transcript, _ in planned)
        with tqdm(total=round(total), unit="s", desc="transcribing (audio seconds)", disable=not progress) as bar:
            async def one(transcript: Transcript, prompts: list[Prompt]) -> Transcript:
                if transcript.error is None:
                    await self.run(transcript, prompts, generate)
                bar.update(round(transcript.duration))
                if on_done is not None:
                    on_done(transcript)
                return transcript

            return list(await asyncio.gather(*(one(t, p) for t, p in planned)))

    def _item(self, window: np.ndarray) -> str | list[dict[str, Any]]:
        item = self.prompt()
        if isinstance(item, list):
            item[0]["content"][0]["audio"] = window
        return item
