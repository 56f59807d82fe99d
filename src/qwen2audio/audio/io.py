"""Turn any audio source a user can hold into 16 kHz mono float32 samples.

Owns decoding (soundfile, then PyAV), channel mix-down, resampling (soxr) and the input checks that
name what was wrong. It must not know about features, tokens or the model.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
import pathlib
import re
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import numpy as np

from qwen2audio.config import SAMPLE_RATE
from qwen2audio.errors import AudioError

logger = logging.getLogger(__name__)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, tuple, Any]

DEFAULT_MAX_DURATION_S = 20 * 60.0
# Clips of 320 samples (20 ms) or fewer at 16 kHz yield no audio token (SPEC.md section 4).
MIN_SAMPLES = 321 * SAMPLE_RATE // 16_000

_URLSAFE_B64 = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class UrlPolicy:
    """What fetching audio over http(s) may do; URLs are refused unless a policy is given.

    ``allow_host`` lets a server refuse private addresses without this module knowing about them.
    """

    max_bytes: int = 25 * 1024 * 1024
    timeout_s: float = 10.0
    allow_host: Any = None  # Callable[[str], bool] | None


def load_audio(
    source: AudioSource,
    sampling_rate: int = SAMPLE_RATE,
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    url_policy: UrlPolicy | None = None,
) -> np.ndarray:
    """Decode ``source`` into float32 mono samples at ``sampling_rate``, clipped to [-1, 1].

    A bare array or tensor is taken to be at ``sampling_rate`` already (as transformers does); an
    ``(array, rate)`` tuple is resampled. Strings are a path, a ``data:`` URI, an http(s) URL (only
    with a ``url_policy``), a ``file://`` URL, or base64-encoded file bytes, tried in that order.
    Raises :class:`AudioError` naming the source and the reason.
    """
    name = _describe(source)
    samples, rate = _to_samples(source, sampling_rate, url_policy, name)
    return _finish(samples, rate, sampling_rate, max_duration_s, name)


def _to_samples(
    source: AudioSource, target_rate: int, url_policy: UrlPolicy | None, name: str
) -> tuple[np.ndarray, int]:
    """Return (samples [n] or [n, channels] or [channels, n], rate) without resampling."""
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[1], (int, np.integer)) or source[1] <= 0:
            raise AudioError(f"{name}: a tuple source must be (array, sampling_rate) with a positive rate")
        return _array_samples(source[0], name), int(source[1])
    if isinstance(source, np.ndarray) or _is_tensor(source):
        return _array_samples(source, name), target_rate
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), name)
    if isinstance(source, pathlib.PurePath):
        return decode_bytes(_read_file(str(source), name), name)
    if isinstance(source, str):
        return decode_bytes(_string_bytes(source, url_policy, name), name)
    if hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise AudioError(f"{name}: file object is open in text mode; open it with 'rb'")
        return decode_bytes(bytes(data), name)
    raise AudioError(f"unsupported audio source type {type(source).__name__}")


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _array_samples(array: Any, name: str) -> np.ndarray:
    """Accept int or float PCM, mono or stereo, numpy or torch; return float32 (channels in an axis)."""
    if _is_tensor(array):
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
    array = np.asarray(array)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        # Unsigned PCM (8-bit WAV) is centred at the midpoint.
        offset = (int(info.max) + 1) // 2 if array.dtype.kind == "u" else 0
        array = (array.astype(np.float64) - offset) / float(int(info.max) + 1 - offset)
    elif array.dtype.kind != "f":
        raise AudioError(f"{name}: array dtype {array.dtype} is not PCM (expected float or integer samples)")
    if array.ndim == 2:
        array = _mix_down(array)
    elif array.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D (mono) or 2-D (stereo) array, got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def _mix_down(array: np.ndarray) -> np.ndarray:
    """Average the channels of a [channels, n] or [n, channels] array (the shorter axis is channels)."""
    channel_axis = 0 if array.shape[0] <= array.shape[1] else 1
    if array.shape[channel_axis] == 1:
        return array.reshape(-1)
    return array.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)


def _string_bytes(text: str, url_policy: UrlPolicy | None, name: str) -> bytes:
    stripped = text.strip()
    if stripped.lower().startswith("data:"):
        return _data_uri_bytes(stripped, name)
    scheme = urllib.parse.urlsplit(stripped).scheme.lower() if "://" in stripped[:16] else ""
    if scheme in ("http", "https"):
        return _fetch_url(stripped, url_policy, name)
    if scheme == "file":
        return _read_file(urllib.request.url2pathname(urllib.parse.urlsplit(stripped).path), name)
    if scheme:
        raise AudioError(f"{name}: unsupported URL scheme {scheme!r} (use a path, http(s), file:// or data:)")
    if len(stripped) < 4096 and os.path.exists(stripped):
        return _read_file(stripped, name)
    decoded = _try_base64(stripped)
    if decoded is not None:
        return decoded
    raise AudioError(f"{name}: no such file, and not a URL, data URI or base64 audio")


def _try_base64(text: str) -> bytes | None:
    if len(text) < 16:
        return None
    compact = "".join(text.split())
    padded = compact + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        pass
    if not _URLSAFE_B64.match(padded):  # urlsafe_b64decode would silently skip foreign characters
        return None
    try:
        return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        return None


def _data_uri_bytes(uri: str, name: str) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None:
        raise AudioError(f"{name}: malformed data URI (expected data:audio/<type>;base64,<data>)")
    mime = match.group("mime").lower()
    if mime and not (mime.startswith("audio/") or mime.startswith("video/") or mime == "application/octet-stream"):
        raise AudioError(f"{name}: data URI has media type {mime!r}, not audio")
    payload = uri[match.end():]
    if not match.group("b64"):
        return urllib.parse.unquote_to_bytes(payload)
    decoded = _try_base64(payload)
    if decoded is None:
        raise AudioError(f"{name}: data URI payload is not valid base64")
    return decoded


def _read_file(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise AudioError(f"{name}: is a directory, not an audio file") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot read file ({exc.strerror or exc})") from None


def _fetch_url(url: str, policy: UrlPolicy | None, name: str) -> bytes:
    if policy is None:
        raise AudioError(f"{name}: fetching audio from URLs is not allowed here (pass the file or its bytes)")
    _check_host(url, policy, name)
    opener = urllib.request.build_opener(_CheckedRedirects(policy, name))
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2audio"})  # noqa: S310 (scheme checked)
    try:
        with opener.open(request, timeout=policy.timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except AudioError:
        raise
    except OSError as exc:
        raise AudioError(f"{name}: download failed ({exc})") from None
    if len(data) > policy.max_bytes:
        raise AudioError(f"{name}: download is larger than the {policy.max_bytes} byte limit")
    return data


def _check_host(url: str, policy: UrlPolicy, name: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise AudioError(f"{name}: unsupported URL scheme {parts.scheme!r}")
    host = parts.hostname or ""
    if policy.allow_host is not None and not policy.allow_host(host):
        raise AudioError(f"{name}: host {host!r} is not allowed")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Apply the host check to every redirect, so a public URL cannot bounce to a private one."""

    def __init__(self, policy: UrlPolicy, name: str) -> None:
        self.policy, self.name = policy, name

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.policy, self.name)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def decode_bytes(data: bytes, name: str = "audio bytes") -> tuple[np.ndarray, int]:
    """Decode a whole audio file held in memory; return (samples [n, channels], rate).

    soundfile (libsndfile) reads WAV, FLAC, Ogg Vorbis/Opus and MP3 exactly and fast; PyAV (FFmpeg)
    covers the containers libsndfile does not (m4a/AAC, WebM, ...).
    """
    if not data:
        raise AudioError(f"{name}: empty (0 bytes)")
    import soundfile

    try:
        with _decoder_messages_logged(name, _looks_like_mp3(data)):
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples, int(rate)
    except Exception as sf_error:  # libsndfile raises several types; PyAV gets the next try
        sf_reason = str(sf_error).split(":")[-1].strip().rstrip(".") or type(sf_error).__name__
    try:
        return _decode_with_av(data, name)
    except AudioError:
        raise
    except Exception as av_error:  # PyAV's error tree is large; all of it means "cannot decode"
        raise AudioError(
            f"{name}: cannot decode audio, unsupported or corrupt format "
            f"(soundfile: {sf_reason}; FFmpeg: {_av_reason(av_error)})"
        ) from None


def _looks_like_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame header at the start."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


@contextlib.contextmanager
def _decoder_messages_logged(name: str, active: bool) -> Iterator[None]:
    """libsndfile's MP3 decoder (mpg123) prints its warnings ("Xing stream size off ...") straight
    to file descriptor 2, past Python: while it runs they are caught in a file and sent to logging.
    The descriptor is the process's, so this is held briefly and one decode at a time."""
    if not active:
        yield
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if line.startswith(_DECODER_MESSAGES):
                    logger.info("%s: decoder: %s", name, line.strip())
                elif line.strip():  # another thread's, written meanwhile: where it was going
                    os.write(2, line.encode())


_STDERR_LOCK = threading.Lock()
_DECODER_MESSAGES = ("Warning: ", "Note: ", "[src/libmpg123/")  # how mpg123 starts its lines


def _av_reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return text.split("] ", 1)[-1] if "]" in text else text or type(error).__name__


def _decode_with_av(data: bytes, name: str) -> tuple[np.ndarray, int]:
    import av

    chunks: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise AudioError(f"{name}: the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        # Planar float keeps every channel apart whatever the codec's native sample format.
        resampler = av.AudioResampler(format="fltp")
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
        except av.error.FFmpegError as exc:
            if not chunks:
                raise
            logger.warning("%s: decoding stopped early (%s); keeping what was decoded", name, exc)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise AudioError(f"{name}: the audio stream holds no samples")
    return np.concatenate(chunks, axis=1).T, int(rate)


def _finish(samples: np.ndarray, rate: int, target_rate: int, max_duration_s: float, name: str) -> np.ndarray:
    """Mix down, validate, resample and clip: the checks every source goes through."""
    if samples.ndim == 2:
        samples = _mix_down(samples)
    if samples.size == 0:
        raise AudioError(f"{name}: the audio holds no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    duration = samples.shape[0] / rate
    if duration > max_duration_s:
        raise AudioError(
            f"{name}: {duration:.1f} s of audio is longer than the {max_duration_s:.0f} s maximum"
        )
    if rate != target_rate:
        import soxr

        samples = soxr.resample(samples, rate, target_rate, quality="HQ")
    min_samples = int(np.ceil(MIN_SAMPLES * target_rate / SAMPLE_RATE))
    if samples.shape[0] < min_samples:
        raise AudioError(
            f"{name}: {1000 * samples.shape[0] / target_rate:.1f} ms of audio is too short to yield an "
            f"audio token (more than 20 ms needed)"
        )
    peak = float(np.abs(samples).max())
    if peak > 1.0:
        if peak > 1.05:
            logger.warning("%s: samples reach %.3g, outside [-1, 1]; clipping", name, peak)
        samples = np.clip(samples, -1.0, 1.0)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _describe(source: Any) -> str:
    """A short name for error messages: never dump megabytes of base64 into a log line."""
    if isinstance(source, pathlib.PurePath):
        return f"audio file {str(source)!r}"
    if isinstance(source, str):
        text = source.strip()
        if text.lower().startswith("data:"):
            return f"data URI ({len(text)} chars)"
        if "://" in text[:16]:
            return f"audio URL {text[:200]!r}"
        if len(text) < 1024 and ("/" in text or "\\" in text or "." in text[-6:] or len(text) < 64):
            return f"audio file {text!r}"
        return f"base64 audio ({len(text)} chars)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(source)} bytes)"
    if isinstance(source, tuple):
        return "audio (array, rate) tuple"
    if isinstance(source, np.ndarray) or _is_tensor(source):
        return f"audio array of shape {tuple(source.shape)}"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, str):
        return f"audio file object {file_name!r}"
    return f"audio {type(source).__name__}"
