"""Tuning for MLX's CPU backend; nothing here changes results beyond float32 rounding, only speed.

MLX's CPU backend takes every intermediate array from malloc and gives it back on free. glibc serves blocks
above its mmap threshold (at most 32 MB) with fresh mappings, so each vocabulary-sized intermediate of a denoising
step (256 x 262,144 float32 = 268 MB) is page-faulted in from zero, 65k faults, about 0.3 s on a 2-core VM, for
every op. Raising the threshold keeps such blocks on the heap, where freed memory is reused. Set
MLX_DGEMMA_KEEP_MALLOC=1 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

import mlx.core as mx

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


# --- exp and tanh for the sampler's vocabulary-sized passes ------------------------------------------------------
#
# MLX's CPU backend evaluates exp and tanh one libm call at a time: 12-25 ns per element here, so the two
# transcendental passes over a 256 x 262,144 canvas cost ~2 s a step, more than the vocabulary matmuls. The same
# functions in plain arithmetic, which a compiled kernel runs several times faster, are accurate to 2e-7 relative
# (exp) and 2e-7 absolute (tanh). exp(x) = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two
# parts, so that n ln 2 is exact): e^r by its Taylor series on |r| <= ln(2)/2 (degree 7), 2^n by writing n into a
# float's exponent bits.

_LOG2E = 1.0 / math.log(2.0)
_LN2_HI, _LN2_LO = 0.693145751953125, 1.42860682030941723212e-6
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float to an integer
_TAYLOR = [1.0 / math.factorial(k) for k in range(8)]


@mx.compile
def _exp_parts(x):
    clamped = mx.maximum(x, -87.0)  # keeps 2^n a normal float; below e^-87 the result is zero
    n = (clamped * _LOG2E + _ROUND) - _ROUND
    r = (clamped - n * _LN2_HI) - n * _LN2_LO
    p = _TAYLOR[7]
    for c in reversed(_TAYLOR[:7]):
        p = p * r + c
    return mx.where(x < -87.0, 0.0, p), (n.astype(mx.int32) + 127) << 23


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (the shifted logits of a softmax)."""
    mantissa, exponent = _exp_parts(x)
    return mantissa * exponent.view(mx.float32)


@mx.compile
def _tanh_from(y, e):
    a = mx.abs(y)
    t = (1.0 - e) / (1.0 + e)  # tanh(a) with e = exp(-2a); near 0 its cancellation costs digits, so use the series
    t = mx.where(a < 0.05, a * (1.0 - a * a * (1.0 / 3.0 - a * a * (2.0 / 15.0))), t)
    return mx.where(y < 0, -t, t)


def tanh(y: mx.array) -> mx.array:
    return _tanh_from(y, exp_nonpositive(-2.0 * mx.abs(y)))


def use_fast_math() -> bool:
    return mx.default_device() == mx.cpu and not os.environ.get("MLX_DGEMMA_LIBM")
