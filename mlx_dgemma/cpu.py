"""Tuning for MLX's CPU backend (Linux); nothing here changes results, only speed.

MLX's CPU backend takes every intermediate array from malloc and gives it back on free. glibc serves blocks
above its mmap threshold (at most 32 MB) with fresh mappings, so each vocabulary-sized intermediate of a denoising
step (256 x 262,144 float32 = 268 MB) is page-faulted in from zero, 65k faults, about 0.3 s on a 2-core VM, for
every op. Raising the threshold keeps such blocks on the heap, where freed memory is reused. Set
MLX_DGEMMA_KEEP_MALLOC=1 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse (glibc only); returns whether anything was changed."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("MLX_DGEMMA_KEEP_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    _done = ok
    return ok
