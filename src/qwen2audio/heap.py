"""The C heap under the engine (glibc's malloc): keep freed memory for reuse while a CPU engine
runs, hand it back to the system when asked.

Owns the two glibc calls this package makes, ``mallopt`` and ``malloc_trim``; elsewhere (macOS,
musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

KEEP_BYTES = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def release() -> None:
    """Hand the heap's free pages back to the system (``malloc_trim``). Loading and quantizing free
    many mid-sized temporaries, and a server's requests free audio and activations of every size
    from several threads; glibc keeps them resident otherwise (0.75 GiB while quantizing the 7B,
    100-250 MB per 512 server requests: bench/RESULTS.md)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def keep_freed() -> bool:
    """Serve allocations under 1 GiB from the heap and keep up to 1 GiB freed at its top (once per
    process; returns whether it applied). glibc's default maps every allocation from 128 KB (its
    threshold adapts up to 32 MB) and unmaps it when freed, so each decode step's activations and
    logits fault fresh zeroed pages in again: 15-20% of a CPU batch's time (bench/RESULTS.md, Ray).
    Left alone where the user set glibc's own variables or preloads another allocator; explicit
    :func:`release` calls still return what is free."""
    libc = _glibc()
    preload = os.environ.get("LD_PRELOAD", "")
    if libc is None or any(name in os.environ for name in _USER_SETTINGS) or "malloc" in preload:
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    logger.debug("heap: keeping freed memory for reuse (%s)", "applied" if applied else "refused by glibc")
    return applied


@functools.cache
def _glibc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl has no malloc_trim)
        return None
