"""The Processor: what users write (conversations, raw prompts, audio) -> model inputs (a Batch).

Owns reading a checkpoint's tokenizer, template and feature settings, loading each audio once, and
assembling left-padded batches with the audio spans the engine needs. It must not touch weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwen2audio.audio.features import FeatureConfig, FeatureExtractor
from qwen2audio.audio.io import DEFAULT_MAX_DURATION_S, UrlPolicy, load_audio
from qwen2audio.audio.segment import Segmentation, Window, check_segmentation, plan_windows
from qwen2audio.config import ModelConfig
from qwen2audio.engine.request import AudioSpan, Prompt
from qwen2audio.errors import ContextLengthError, InputError, PromptError
from qwen2audio.hub import PROCESSOR_FILES, resolve_checkpoint
from qwen2audio.text.prompt import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    ChatTemplate,
    expand_audio_tokens,
    load_chat_template,
    normalize_messages,
)
from qwen2audio.text.tokenizer import Tokenizer

Conversation = list[dict[str, Any]]
PromptInput = Conversation | str


@dataclass
class Batch:
    """Model inputs in the reference's names, plus the per-row audio layout.

    input_ids, attention_mask: LongTensor [B, T], left padded.
    input_features: FloatTensor [W, n_mels, frames]; feature_attention_mask: LongTensor [W, frames].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    input_features: torch.Tensor
    feature_attention_mask: torch.Tensor
    token_ids: list[list[int]]
    audio_spans: list[list[AudioSpan]]
    window_tokens: list[int] = field(default_factory=list)


class Processor:
    """Turns conversations (Instruct) and raw prompts (base model) into a :class:`Batch`.

    Matches transformers' ``Qwen2AudioProcessor`` (4.48-5.15) for clips of 30 s or less; longer
    clips are split into windows of at most 30 s instead of being cut, in pauses unless
    ``segmentation`` is "fixed" (see :func:`~qwen2audio.audio.segment.plan_windows`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate,
        feature_extractor: FeatureExtractor | None = None,
        max_context: int | None = None,
        url_policy: UrlPolicy | None = None,
        max_audio_seconds: float = DEFAULT_MAX_DURATION_S,
        segmentation: Segmentation = "vad",
    ) -> None:
        check_segmentation(segmentation)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.feature_extractor = feature_extractor or FeatureExtractor()
        self.max_context = max_context
        self.url_policy = url_policy
        self.max_audio_seconds = max_audio_seconds
        self.segmentation = segmentation
        self.audio_id = self._special_id(AUDIO_TOKEN)
        self.audio_bos_id = self._special_id(AUDIO_BOS)
        self.audio_eos_id = self._special_id(AUDIO_EOS)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise PromptError(f"the tokenizer has no {token} token: not a Qwen2-Audio tokenizer")
        return token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, chat_template: str | None = None,
                        **options: Any) -> Processor:
        """Read a checkpoint directory (or hub id) without loading weights. ``chat_template``: Jinja
        source to use instead of the checkpoint's; ``max_context`` (an option) defaults to the model's."""
        directory = resolve_checkpoint(name_or_path, allow_patterns=PROCESSOR_FILES)
        tokenizer = Tokenizer.from_dir(directory)
        source = chat_template if chat_template is not None else load_chat_template(directory, tokenizer.config)
        template = ChatTemplate(source, _template_tokens(tokenizer))
        feature_config = FeatureConfig.from_dict(_feature_settings(directory))
        features = FeatureExtractor(feature_config)
        if options.get("max_context") is None:
            options["max_context"] = _max_context(directory, tokenizer)
        return cls(tokenizer, template, features, **options)

    def __call__(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        audios: Sequence[Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        device: str | torch.device | None = None,
    ) -> Batch:
        """Prepare and collate a batch; see :meth:`prepare` for what one item may be."""
        prompts = self.prepare_many(as_batch(inputs), audios, add_generation_prompt=add_generation_prompt)
        return self.collate(prompts, device=device)

    def prepare_many(
        self, items: Sequence[PromptInput], audios: Sequence[Any] | None = None, *, add_generation_prompt: bool = True
    ) -> list[Prompt]:
        """Prepare several rows; raw prompts take ``audios`` in order, and every audio must be taken."""
        pending = iter(list(audios or []))
        prompts = [self.prepare(item, pending, add_generation_prompt=add_generation_prompt) for item in items]
        leftover = sum(1 for _ in pending)
        if leftover:
            raise PromptError(f"{leftover} audio(s) were given that no {AUDIO_TOKEN} placeholder takes")
        return prompts

    def render(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        """The conversation as the checkpoint's template writes it (one placeholder per audio)."""
        messages, _ = normalize_messages(conversation)
        return self.chat_template.render(messages, add_generation_prompt)

    def prepare(
        self, item: PromptInput, audios: Iterator[Any] | None = None, *, add_generation_prompt: bool = True
    ) -> Prompt:
        """One row: a conversation (list of messages) or a raw prompt whose ``<|AUDIO|>``
        placeholders take the next audios from ``audios``."""
        if isinstance(item, str):
            text, sources = item, _take(audios, item.count(AUDIO_TOKEN))
        elif isinstance(item, (list, tuple)):
            messages, parts = normalize_messages(item)
            text = self.chat_template.render(messages, add_generation_prompt)
            sources = [(part.source, part.where) for part in parts]
        else:
            raise PromptError(
                f"a prompt must be a conversation (list of messages) or a string, not {type(item).__name__}"
            )
        self._check_length(text)
        samples = [self._load(source, where) for source, where in sources]
        self._check_audio_fits(samples)
        windows = [self.plan(s) for s in samples]
        counts = [self.feature_extractor.token_count(s, w) for s, w in zip(samples, windows, strict=True)]
        ids, placements = expand_audio_tokens(
            self.tokenizer.encode(text), counts, self.audio_id, self.audio_bos_id, self.audio_eos_id
        )
        if self.max_context is not None and len(ids) > self.max_context:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens ({sum(counts)} of them audio), more than the "
                                     f"model's context of {self.max_context}")
        digests = [_digest(s, w) for s, w in zip(samples, windows, strict=True)]
        return Prompt(ids, samples, [p.offset for p in placements], digests, [p.length for p in placements], windows)

    def plan(self, samples: np.ndarray) -> list[Window]:
        """The windows a clip in a prompt is encoded in: all of it, cut as ``segmentation`` says."""
        return plan_windows(samples, self.segmentation, self.feature_extractor.config.chunk_length,
                            skip_silence=False)

    def _check_length(self, text: str) -> None:
        """Refuse a text that cannot fit the context before tokenizing it (megabytes of text would
        take seconds): it has at least len(text) / max_token_bytes tokens."""
        if self.max_context is None:
            return
        at_least = -(-len(text) // self.tokenizer.max_token_bytes)
        if at_least > self.max_context:
            raise ContextLengthError(f"the prompt is {len(text)} characters, at least {at_least} tokens: more than "
                                     f"the model's context of {self.max_context}")

    def _check_audio_fits(self, samples: Sequence[np.ndarray]) -> None:
        """Refuse audio that cannot fit the context before planning its windows (a VAD pass over
        minutes of audio), from the floor :func:`audio_tokens_at_least` puts on its tokens."""
        if self.max_context is None or not samples:
            return
        config = self.feature_extractor.config
        at_least = sum(audio_tokens_at_least(len(s), config) for s in samples)
        if at_least > self.max_context:
            seconds = sum(len(s) for s in samples) / config.sampling_rate
            raise ContextLengthError(f"the prompt holds at least {at_least} audio tokens ({seconds:.0f} s of audio), "
                                     f"more than the model's context of {self.max_context}")

    def _load(self, source: Any, where: str) -> np.ndarray:
        try:
            return load_audio(source, url_policy=self.url_policy, max_duration_s=self.max_audio_seconds)
        except InputError as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def collate(self, prompts: Sequence[Prompt], device: str | torch.device | None = None) -> Batch:
        """Left-pad rows and featurize every audio window of the batch at once."""
        if not prompts:
            raise PromptError("the batch is empty")
        width = max(p.num_tokens for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - prompt.num_tokens:] = torch.tensor(prompt.token_ids, dtype=torch.long)
            attention_mask[row, width - prompt.num_tokens:] = 1
        clips = [clip for p in prompts for clip in p.audios]
        features = self.feature_extractor(clips, device=device, windows=[w for p in prompts for w in p.windows])
        spans: list[list[AudioSpan]] = []
        window, clip = 0, 0
        for prompt in prompts:
            row_spans = []
            for offset, length, digest in zip(prompt.offsets, prompt.lengths, prompt.digests, strict=True):
                n_windows = features.window_counts[clip]
                row_spans.append(AudioSpan(offset, length, window, n_windows, digest))
                window, clip = window + n_windows, clip + 1
            spans.append(row_spans)
        if device is not None:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        return Batch(
            input_ids,
            attention_mask,
            features.input_features,
            features.feature_attention_mask,
            [p.token_ids for p in prompts],
            spans,
            features.window_tokens,
        )


def audio_tokens_at_least(num_samples: int, config: FeatureConfig) -> int:
    """A floor on the audio tokens of a clip however it is cut into windows of at most one window's
    samples, none but the last shorter than half of that: a window of n samples yields at least
    n / 640 - 1/2 tokens (frames of 160 samples, halved twice, each time rounding down by at most 1/2)."""
    per_token, half = 4 * config.hop_length, config.n_samples // 2
    return max(int(num_samples / per_token - (num_samples // half + 2)), 0)


def _digest(samples: np.ndarray, windows: Sequence[Window]) -> str:
    """Keys the encoder and prefix caches: the clip's content and where it is cut. SHA-256 runs on
    the CPU's SHA extensions: about 1 ms for a 30 s clip, 2.5x faster than BLAKE2b here, and it is on
    the time-to-first-token path. The buffer is hashed in place (no copy)."""
    digest = hashlib.sha256(np.ascontiguousarray(samples).data)
    digest.update(np.array([(w.start, w.end) for w in windows], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def as_batch(inputs: Any) -> list[PromptInput]:
    """A single conversation or string becomes a batch of one."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise PromptError("no inputs given")
        if all(isinstance(x, dict) for x in inputs):
            return [list(inputs)]
        return list(inputs)
    raise PromptError(f"inputs must be a conversation, a string, or a list of them, not {type(inputs).__name__}")


def _take(audios: Iterator[Any] | None, count: int) -> list[tuple[Any, str]]:
    taken = []
    for k in range(count):
        source = next(audios, _MISSING) if audios is not None else _MISSING
        if source is _MISSING:
            raise PromptError(
                f"the prompt has more {AUDIO_TOKEN} placeholders than audios were given "
                f"(ran out at placeholder {k + 1})"
            )
        taken.append((source, f"audio for placeholder {k + 1}"))
    return taken


_MISSING = object()


def _template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    names = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer.config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            names[key] = value
    return names


def _read_optional_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise PromptError(f"{path}: cannot read ({exc})") from None


def _feature_settings(directory: pathlib.Path) -> dict[str, Any]:
    """preprocessor_config.json (published checkpoints), else the "feature_extractor" entry of the
    processor_config.json that transformers 5 writes."""
    settings = _read_optional_json(directory / "preprocessor_config.json")
    if settings:
        return settings
    return _read_optional_json(directory / "processor_config.json").get("feature_extractor") or {}


def _max_context(directory: pathlib.Path, tokenizer: Tokenizer) -> int | None:
    """The decoder's position limit from config.json, else the tokenizer's model_max_length."""
    if (directory / "config.json").is_file():
        return ModelConfig.from_dir(directory).text.max_position_embeddings
    return tokenizer.model_max_length
