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


class BodyError(ValueError):
    """The body is not JSON we take; the message is meant for the client."""


def parse(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` parsed, or BodyError when it is not JSON or nests deeper than ``max_depth``."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BodyError(f"the request body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"the request body is not valid JSON ({exc})") from None
    if depth(data, max_depth) > max_depth:
        raise BodyError(f"the request body nests deeper than {max_depth} levels")
    return data


def depth(data: Any, stop_past: int = MAX_DEPTH) -> int:
    """How deeply lists and objects nest (iteratively: no recursion to exhaust); counting stops
    once past ``stop_past``."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > stop_past:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def parse_in_child(chunks: Sequence[bytes], max_depth: int = MAX_DEPTH) -> Any:
    """The body made of ``chunks`` parsed by a child interpreter, so this process's interpreter lock
    stays free. The chunks are never joined here (copying megabytes at once holds the lock too), and
    the child is started from a worker thread: forking a process this size from the event loop
    would stall it for tens of milliseconds."""
    returncode, out = await asyncio.to_thread(_run_child, chunks, max_depth)
    if returncode != 0 or not out:
        raise BodyError("the request body could not be parsed (too large to hold in memory?)")
    ok, value = pickle.loads(out)  # noqa: S301 (written by our own child from parsed JSON)
    if not ok:
        raise BodyError(value)
    return value


def _run_child(chunks: Sequence[bytes], max_depth: int) -> tuple[int, bytes]:
    command = [sys.executable, "-I", "-S", __file__, str(max_depth)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    with subprocess.Popen(command, **pipes) as child:  # noqa: S603 (this interpreter, this file)
        try:
            for chunk in chunks:
                child.stdin.write(chunk)
            child.stdin.close()
            out = child.stdout.read()
        except BrokenPipeError:  # the child died reading (out of memory)
            out = b""
    return child.returncode, out


def _child() -> None:
    try:
        reply = (True, parse(sys.stdin.buffer.read(), int(sys.argv[1])))
    except BodyError as exc:
        reply = (False, str(exc))
    sys.stdout.buffer.write(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _child()
