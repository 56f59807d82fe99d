"""Qwen2 byte-level BPE through the `tokenizers` library, and the incremental detokenizer for streaming.

Owns reading tokenizer files (tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json) and
turning ids back into text; it must not know about chat templates or audio.
"""

from __future__ import annotations

import codecs
import functools
import json
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from qwen2audio.errors import PromptError

# SPEC.md section 4: the Qwen2 pre-tokenizer split.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class TokenizerError(ValueError):
    """Tokenizer files missing or inconsistent."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-in of each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()
_LONG_TEXT = 16384  # characters past which encode() uses the GIL-releasing batch call


class Tokenizer:
    """Encode text to ids and ids to text, exactly as transformers' ``Qwen2Tokenizer``.

    Special tokens in text are always matched as whole tokens (``split_special_tokens=False``); no
    BOS is added. ``special_ids`` are the tokens ``skip_special_tokens`` removes.
    """

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any]) -> None:
        self._backend = backend
        self.config = config
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_bytes = {i: tok.content.encode("utf-8") for i, tok in added.items()}
        self._token_bytes: dict[int, bytes] = {}  # filled lazily: most ids are never streamed
        self.eos_token = _token_name(config.get("eos_token")) or "<|endoftext|>"
        self.pad_token = _token_name(config.get("pad_token")) or "<|endoftext|>"
        self.eos_id = self._required_id(self.eos_token)
        self.pad_id = self._required_id(self.pad_token)
        self.model_max_length = int(config.get("model_max_length") or 0) or None

    @classmethod
    def from_dir(cls, directory: str | pathlib.Path) -> Tokenizer:
        """Read ``tokenizer.json`` when present, else build from vocab.json + merges.txt."""
        directory = pathlib.Path(directory)
        config = _read_json(directory / "tokenizer_config.json", required=False)
        if (directory / "tokenizer.json").is_file():
            backend = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = _build_bpe(directory, config)
        else:
            raise TokenizerError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, config)

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no {token!r} token")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Long texts go through the batch call, which releases the GIL while
        it works (a plain encode holds it: 14 MB held a server's event loop for 18 s)."""
        try:
            if len(text) > _LONG_TEXT:
                return self._backend.encode_batch([text], add_special_tokens=False)[0].ids
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_encodable(text)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError:
            for text in texts:
                _check_encodable(text)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (an added token's content as UTF-8)."""
        if token_id in self._added_bytes:
            return self._added_bytes[token_id]
        cached = self._token_bytes.get(token_id)
        if cached is None:
            token = self._backend.id_to_token(token_id) or ""
            cached = bytes(_BYTE_DECODER.get(ch, 0) for ch in token)
            self._token_bytes[token_id] = cached
        return cached

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n characters has at least n / this many
        tokens, a bound that refuses a far too long prompt without tokenizing it."""
        vocab = self._backend.get_vocab(with_added_tokens=True)  # byte-level names: a character per byte
        return max((len(self.token_bytes(i)) if i in self._added_bytes else len(name) for name, i in vocab.items()),
                   default=1)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def detokenizer(self, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, tuple(stop), skip_special_tokens)


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: pathlib.Path, required: bool = True) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise TokenizerError(f"{path}: missing") from None
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from None


def _build_bpe(directory: pathlib.Path, config: dict[str, Any]) -> _HFTokenizer:
    """Assemble the Qwen2 tokenizer from its parts, as transformers' Qwen2Tokenizer does."""
    model = BPE.from_file(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    backend = _HFTokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    added = sorted((int(i), spec) for i, spec in (config.get("added_tokens_decoder") or {}).items())
    for token_id, spec in added:
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False),
        )
        backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
        if backend.token_to_id(spec["content"]) != token_id:
            raise TokenizerError(
                f"{directory}: added token {spec['content']!r} should have id {token_id} but got "
                f"{backend.token_to_id(spec['content'])} (vocab.json and added_tokens_decoder disagree)"
            )
    return backend


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas for streaming.

    Bytes go through an incremental UTF-8 decoder, so a character split across byte-level tokens
    is emitted whole once its last byte arrives. Text that could be the start of a stop string is
    held back until it is known not to be one; the stop string itself is never emitted.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    text: str = ""
    stopped_on: str | None = None
    _emitted: int = 0
    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that is now safe to show (possibly empty)."""
        if self.stopped_on is not None:
            return ""
        if not (self.skip_special_tokens and token_id in self.tokenizer.special_ids):
            self.text += self._decoder.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back (incomplete bytes become U+FFFD, as a one-shot decode does)."""
        if self.stopped_on is None:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    @property
    def output(self) -> str:
        """All text released so far (the final answer once finished)."""
        return self.text[: self._emitted]

    def _release(self, final: bool) -> str:
        if self.stopped_on is not None:
            return ""
        pending = self.text[self._emitted:]
        hit = self._first_stop(pending)
        if hit is not None:
            position, stop = hit
            self.stopped_on = stop
            self.text = self.text[: self._emitted + position]
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._held_back(pending)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def _first_stop(self, pending: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            position = pending.find(stop) if stop else -1
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of ``pending`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if stop.startswith(pending[-size:]):
                    longest = size
                    break
        return longest


def _check_encodable(text: object) -> None:
    """Name the problem when the tokenizers library refuses a text: a lone UTF-16 surrogate (which
    JSON's \\ud800 escapes can carry into a Python str) has no UTF-8 form."""
    if not isinstance(text, str):
        raise PromptError(f"text must be a string, not {type(text).__name__}")
    for index, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            raise PromptError(f"the text has an unpaired surrogate U+{ord(char):04X} at character {index}: "
                              "it is not valid Unicode")
