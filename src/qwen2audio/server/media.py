"""Which audio a server request may point at, checked before anything is read or fetched.

Owns the server's media policy: data URIs and base64 always; http(s) only when enabled and never
to private, loopback or link-local addresses (redirects included) unless the host is allow-listed;
file:// only inside one directory, after resolving `..` and symlinks. Bare paths are never read.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import pathlib
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from qwen2audio.audio.io import UrlPolicy, load_audio
from qwen2audio.errors import AudioError
from qwen2audio.text.prompt import AudioPart, normalize_messages


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    local_root: pathlib.Path | None = None
    max_bytes: int = 25 * 1024 * 1024
    timeout_s: float = 10.0

    def host_allowed(self, host: str) -> bool:
        """True for allow-listed hosts, else only if every address the name resolves to is public."""
        if host.lower() in self.allowed_hosts:
            return True
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        addresses = {info[4][0] for info in infos}
        return bool(addresses) and all(_public(address) for address in addresses)

    def resolve(self, part: AudioPart) -> Any:
        """A load_audio source that is safe to read: bytes, a checked path, or decoded samples."""
        source = part.source
        if not isinstance(source, str):
            raise AudioError(f"{part.where}: audio must be a string (data URI, URL or base64)")
        text = source.strip()
        if part.kind == "input_audio":
            return _base64_bytes(text, part.where)
        scheme = urllib.parse.urlsplit(text).scheme.lower() if ":" in text[:12] else ""
        if scheme == "data":
            return text
        if scheme in ("http", "https"):
            return self._remote(text, part.where)
        if scheme == "file":
            return self._local(text, part.where)
        if scheme:
            raise AudioError(f"{part.where}: URL scheme {scheme!r} is not allowed (data:, http(s):, file:)")
        if part.kind == "audio":
            return _base64_bytes(text, part.where)
        raise AudioError(f"{part.where}: audio_url must be a data: URI, an http(s) URL or a file:// URL")

    def _remote(self, url: str, where: str) -> Any:
        if not self.allow_remote:
            raise AudioError(f"{where}: remote audio URLs are disabled on this server (--allow-remote-audio)")
        host = urllib.parse.urlsplit(url).hostname or ""
        if not self.host_allowed(host):
            raise AudioError(f"{where}: host {host!r} is not allowed (private, loopback or link-local address)")
        # The host was just checked: the loader checks only where redirects lead (one DNS lookup less).
        policy = UrlPolicy(max_bytes=self.max_bytes, timeout_s=self.timeout_s,
                           allow_host=lambda name: name == host or self.host_allowed(name))
        return load_audio(url, url_policy=policy)

    def _local(self, url: str, where: str) -> str:
        if self.local_root is None:
            raise AudioError(f"{where}: file:// URLs are disabled on this server (--allowed-local-media-path)")
        name = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        if "\x00" in name:
            raise AudioError(f"{where}: a file:// URL may not hold a NUL byte")
        path = pathlib.Path(os.path.realpath(name))
        root = pathlib.Path(os.path.realpath(self.local_root))
        if not path.is_relative_to(root):
            raise AudioError(f"{where}: {url} is outside the allowed media directory")
        return str(path)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
                or ip.is_unspecified)


def _base64_bytes(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise AudioError(f"{where}: audio data is not valid base64") from None
    if not data:
        raise AudioError(f"{where}: audio data is empty")
    return data


def count_audio_parts(messages: list[dict[str, Any]]) -> int:
    """How many audio clips a conversation holds, counted before any is fetched or decoded."""
    return len(normalize_messages(messages)[1])


def resolve_messages(messages: list[dict[str, Any]], policy: MediaPolicy) -> list[dict[str, Any]]:
    """The conversation with every audio part replaced by a source the policy allows."""
    normalized, parts = normalize_messages(messages)
    sources = iter([policy.resolve(part) for part in parts])
    for message in normalized:
        if isinstance(message["content"], list):
            message["content"] = [{"type": "audio", "audio": next(sources)} if p["type"] == "audio" else p
                                  for p in message["content"]]
    return normalized
