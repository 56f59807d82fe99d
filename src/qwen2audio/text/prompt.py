"""Chat template rendering, message normalisation and ``<|AUDIO|>`` expansion.

Owns the shapes users write messages in and the id-level placeholder expansion; it must not load
audio or compute features (the Processor does), only say where each audio goes.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen2audio.errors import PromptError

AUDIO_TOKEN = "<|AUDIO|>"  # noqa: S105 (a token, not a password)
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_PLACEHOLDER = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS  # one clip in a base-model (raw) prompt

# transformers' Qwen2AudioProcessor.default_chat_template: used when a checkpoint ships none.
DEFAULT_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def load_chat_template(directory: pathlib.Path, tokenizer_config: Mapping[str, Any]) -> str:
    """The checkpoint's template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        if template:
            return _pick_default(template)
    template = tokenizer_config.get("chat_template")
    return _pick_default(template) if template else DEFAULT_CHAT_TEMPLATE


def _pick_default(template: str | list[dict[str, str]]) -> str:
    if isinstance(template, str):
        return template
    named = {item.get("name"): item.get("template") for item in template}
    return named.get("default") or next(iter(named.values()))


class ChatTemplate:
    """A checkpoint's Jinja chat template, rendered in a sandbox with transformers' settings."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        # False for the built-in fallback: base checkpoints ship no template and want raw prompts.
        self.has_checkpoint_template = source != DEFAULT_CHAT_TEMPLATE
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise PromptError(f"the chat template does not compile: {exc}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except PromptError:
            raise
        except Exception as exc:  # a template can raise anything; all of it is the template's failure
            raise PromptError(f"the chat template failed to render: {exc}") from None


def _raise_exception(message: str) -> None:
    raise PromptError(f"the chat template refused the conversation: {message}")


@dataclass(frozen=True)
class AudioPart:
    """Where an audio came from, as the user wrote it; the Processor turns it into samples."""

    source: Any
    where: str
    kind: str = "audio"  # "audio" (any source), "url" (audio_url forms) or "input_audio" (base64 data)


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], list[AudioPart]]:
    """Validate a conversation and bring every content part to the template's two shapes.

    Accepted audio parts: ``{"type": "audio", "audio": src}``, ``{"type": "audio", "audio_url": src}``
    (Qwen's README), OpenAI's ``{"type": "input_audio", "input_audio": {"data", "format"}}`` and
    vLLM's ``{"type": "audio_url", "audio_url": {"url"}}``. Returns the messages with audio parts as
    ``{"type": "audio", "audio": "<audio K>"}`` and the audio sources in order of appearance.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("a conversation must be a non-empty list of messages")
    normalized: list[dict[str, Any]] = []
    audios: list[AudioPart] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise PromptError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError(f"{where}.role must be a non-empty string")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            normalized.append({"role": role, "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        parts = [_normalize_part(part, f"{where}.content[{k}]", audios) for k, part in enumerate(content)]
        normalized.append({"role": role, "content": parts})
    return normalized, audios


def _normalize_part(part: Any, where: str, audios: list[AudioPart]) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise PromptError(f"{where} must be an object or a string, got {type(part).__name__}")
    kind = part.get("type")
    if kind in (None, "text") and "text" in part:
        if not isinstance(part["text"], str):
            raise PromptError(f"{where}.text must be a string")
        return {"type": "text", "text": part["text"]}
    source = _audio_source(part, kind, where)
    form = "input_audio" if kind == "input_audio" else ("url" if "audio_url" in part else "audio")
    audios.append(AudioPart(source, where, form))
    return {"type": "audio", "audio": f"<audio {len(audios)}>"}


def _audio_source(part: Mapping[str, Any], kind: Any, where: str) -> Any:
    if kind in ("audio", None) and "audio" in part:
        return part["audio"]
    if kind in ("audio", None) and isinstance(part.get("audio_url"), str):
        return part["audio_url"]
    if kind == "input_audio":
        payload = part.get("input_audio")
        if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), str):
            raise PromptError(f"{where}: input_audio must be an object with base64 'data' (and 'format')")
        return payload["data"]
    if kind in ("audio_url", "audio"):
        payload = part.get("audio_url")
        url = payload.get("url") if isinstance(payload, Mapping) else None
        if not isinstance(url, str):
            raise PromptError(f"{where}: audio_url must be an object with a 'url' string")
        return url
    raise PromptError(
        f"{where}: unknown content part type {kind!r} (expected text, audio, input_audio or audio_url)"
    )


@dataclass(frozen=True)
class Placement:
    """One audio's tokens inside a row's ids: ``ids[offset:offset + length]`` are <|AUDIO|>."""

    offset: int
    length: int


def expand_audio_tokens(
    ids: Sequence[int], token_counts: Sequence[int], audio_id: int, bos_id: int, eos_id: int
) -> tuple[list[int], list[Placement]]:
    """Replace the k-th ``<|AUDIO|>`` id with ``token_counts[k]`` copies.

    Like transformers 4.48-5.15, a placeholder with neither ``<|audio_bos|>`` before it nor
    ``<|audio_eos|>`` after it gets both added around it.
    """
    positions = [i for i, token in enumerate(ids) if token == audio_id]
    if len(positions) != len(token_counts):
        raise PromptError(
            f"the prompt has {len(positions)} {AUDIO_TOKEN} placeholder(s) but {len(token_counts)} audio(s) were given"
        )
    out: list[int] = []
    placements: list[Placement] = []
    previous = 0
    for position, count in zip(positions, token_counts, strict=True):
        out.extend(ids[previous:position])
        wrapped = (position > 0 and ids[position - 1] == bos_id) or (
            position + 1 < len(ids) and ids[position + 1] == eos_id
        )
        if not wrapped:
            out.append(bos_id)
        placements.append(Placement(len(out), count))
        out.extend([audio_id] * count)
        if not wrapped:
            out.append(eos_id)
        previous = position + 1
    out.extend(ids[previous:])
    return out, placements
