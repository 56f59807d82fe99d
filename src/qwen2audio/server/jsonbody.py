"""Request bodies parsed as JSON with their nesting bounded, in this process or in a child.

``json.loads`` holds the interpreter lock for the whole parse, so a thread does not keep a
multi-megabyte body from stalling the event loop (a 15 MB body: 15 ms alone, over 100 ms on a busy
two-core machine). Bodies that large are parsed in a short-lived child interpreter instead, which
hands back a pickle that loads in about a millisecond: under the hostile-traffic test on two cores
the worst event-loop stall fell from 110-170 ms (parsed in a thread) to under 50 ms. This module
imports only the standard library, so the child starts in tens of milliseconds (run as a script
with ``-I -S``, it never imports the package and its torch).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

MAX_DEPTH = 64  # deeper bodies are refused (nothing we take nests past a few levels)
MAX_CONTAINERS = 100_000  # objects and arrays in one body: building each costs, even in a child
MAX_VALUES = 4_000_000  # all values (a batch of token-id prompts stays far below)


class BodyError(ValueError):
    """The body is not JSON we take; the message is meant for the client."""


def parse(raw: bytes) -> Any:
    """``raw`` parsed, or BodyError when it is not JSON or is shaped past the limits above (the
    parsed value still has to travel back from a child and be freed on the event loop)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BodyError(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"the request body is not valid JSON ({exc})") from None
    check_shape(data)
    return data


def check_shape(data: Any) -> None:
    """BodyError when lists and objects nest past MAX_DEPTH, or there are more than MAX_CONTAINERS
    of them or MAX_VALUES values in all; walked iteratively (no recursion to exhaust), stopping at
    the first limit passed."""
    containers, values, stack = 0, 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        values += 1
        if isinstance(item, (dict, list)):
            containers += 1
            if level > MAX_DEPTH:
                raise BodyError(f"the request body nests deeper than {MAX_DEPTH} levels")
            if containers > MAX_CONTAINERS or values + len(item) > MAX_VALUES:
                raise BodyError(f"the request body holds more than {MAX_CONTAINERS} objects and arrays or "
                                f"{MAX_VALUES} values")
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))


async def parse_in_child(chunks: Sequence[bytes]) -> Any:
    """The body made of ``chunks`` parsed by a child interpreter, so this process's interpreter lock
    stays free. The chunks are never joined here (copying megabytes at once holds the lock too), and
    the child is started from a worker thread: forking a process this size from the event loop
    would stall it for tens of milliseconds."""
    returncode, out = await asyncio.to_thread(_run_child, chunks)
    if returncode != 0 or not out:
        raise BodyError("the request body could not be parsed (too large to hold in memory?)")
    ok, value = pickle.loads(out)  # noqa: S301 (written by our own child from parsed JSON)
    if not ok:
        raise BodyError(value)
    return value


def _run_child(chunks: Sequence[bytes]) -> tuple[int, bytes]:
    """(exit status, stdout) of the child fed ``chunks``; (-1, b"") when it died before reading them all."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    try:
        with subprocess.Popen([sys.executable, "-I", "-S", __file__], **pipes) as child:  # noqa: S603 (this file)
            for chunk in chunks:
                child.stdin.write(chunk)
            child.stdin.close()
            out = child.stdout.read()
    except BrokenPipeError:  # killed while reading (out of memory); leaving the block waited for it
        return -1, b""
    return child.returncode, out


def _child() -> None:
    try:
        reply = (True, parse(sys.stdin.buffer.read()))
    except BodyError as exc:
        reply = (False, str(exc))
    sys.stdout.buffer.write(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _child()
