"""Handing freed heap memory back to the operating system (glibc's malloc_trim); a no-op where there is none."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None                         # macOS, musl: nothing to hand back this way
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


def malloc_trim() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0): ~1 ms here, more on a large fragmented heap);
    a no-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)
