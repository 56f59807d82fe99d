"""The base model's task prompts (Qwen2-Audio report) and the language names they use.

Owns the one table of languages and the raw-prompt wording of recognition, translation and
classification tasks, shared by transcription (transcribe.py) and evaluation (evaluation.py).
"""

from __future__ import annotations

from qwen2audio.text.prompt import AUDIO_PLACEHOLDER

LANGUAGES = {"en": "English", "zh": "Chinese", "yue": "Cantonese", "fr": "French", "de": "German",
             "es": "Spanish", "it": "Italian", "ja": "Japanese", "ko": "Korean", "ru": "Russian",
             "pt": "Portuguese", "ar": "Arabic", "nl": "Dutch"}


def language_name(code: str | None) -> str | None:
    """English name of a language code; an unknown code stands for itself."""
    return None if code is None else LANGUAGES.get(code, code)


def recognition_prompt(language: str | None = None) -> str:
    """Speech recognition; the language tag (``<|en|>``) is left out when the language is unknown."""
    tag = f"<|{language}|>" if language else ""
    return f"{AUDIO_PLACEHOLDER}Detect the language and recognize the speech: {tag}"


def translation_prompt(target: str = "en") -> str:
    """Speech translation into the language ``target`` (a code)."""
    return f"{AUDIO_PLACEHOLDER}Translate the speech into {language_name(target)}:"


def classification_prompt(instruction: str) -> str:
    """A classification task's instruction after the clip (e.g. MELD's emotion keywords)."""
    return AUDIO_PLACEHOLDER + instruction
