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
# (exp) and 3e-7 absolute (tanh). exp(x) = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two
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


_TANH_CLAMP = 7.90531110763549805  # tanh rounds to +-1 in float32 beyond this


@mx.compile
def tanh(x: mx.array) -> mx.array:
    """tanh as a ratio of odd/even polynomials (the rational approximation Eigen uses), within 3e-7 absolute."""
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = x2 * p + -8.60467152213735e-11
    p = x2 * p + 5.12229709037114e-08
    p = x2 * p + 1.48572235717979e-05
    p = x2 * p + 6.37261928875436e-04
    p = x2 * p + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = x2 * q + 2.26843463243900e-03
    q = x2 * q + 4.89352518554385e-03
    return x * p / q


def use_fast_math() -> bool:
    return mx.default_device() == mx.cpu and not os.environ.get("MLX_DGEMMA_LIBM")
