"""Tuning for MLX's CPU backend; nothing here changes results beyond float32 rounding, only speed.

Which of these run is the backend profile's choice (`backend.py`), made once, not a device check here.

MLX keeps freed buffers in a cache for reuse, but on the CPU backend that cache is limited to 32 MB by default
(on Metal it is the memory limit). Every vocabulary-sized intermediate of a denoising step (256 x 262,144 float32
= 268 MB) then goes back to malloc, and glibc hands such blocks back to the kernel, so the next step page-faults
them in from zero: ~900k faults, about 1 s of a 3-4 s step on a 2-core VM. `keep_buffers` gives the CPU the
same cache limit Metal has. Set MLX_DGEMMA_CPU_CACHE=0 to keep MLX's default.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import mlx.core as mx

from . import backend


def keep_buffers() -> bool:
    """Under the CPU profile, let MLX cache freed buffers up to its memory limit; returns whether it changed."""
    if not backend.current().keep_buffers:
        return False
    limit = mx.get_memory_limit()
    return mx.set_cache_limit(limit) != limit


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


_TANH_CLAMP = 7.90531110763549805  # tanh rounds to +-1 in float32 beyond this


def tanh_rational(x: mx.array) -> mx.array:
    """tanh as a ratio of odd/even polynomials (the rational approximation Eigen uses), within 3e-7 absolute.

    Uncompiled, so that callers can fuse it into their own compiled functions (training's GELU)."""
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


_tanh_compiled = mx.compile(tanh_rational)


def tanh(x: mx.array) -> mx.array:
    """tanh: the rational approximation on the CPU, the backend's own elsewhere."""
    return _tanh_compiled(x) if use_fast_math() else mx.tanh(x)


@mx.compile
def _soft_cap_rational(x, cap, temp):
    return cap * tanh_rational(x / cap) / temp


@mx.compile
def _soft_cap_libm(x, cap, temp):
    return cap * mx.tanh(x / cap) / temp


def soft_cap(x: mx.array, cap: float, temp: mx.array | float = 1.0) -> mx.array:
    """`cap * tanh(x / cap) / temp` in one fused pass (four passes over the logits when written out)."""
    return (_soft_cap_rational if use_fast_math() else _soft_cap_libm)(x, mx.array(cap, x.dtype), mx.array(temp, x.dtype))


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (the shifted logits of a softmax): the polynomial on the CPU, the backend's elsewhere."""
    return exp_polynomial(x) if use_fast_math() else mx.exp(x)


def exp_polynomial(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 in plain arithmetic, within 2e-7 relative."""
    mantissa, exponent = _exp_parts(x)
    return mantissa * exponent.view(mx.float32)


def use_fast_math() -> bool:
    """Whether the arithmetic exp/tanh replace libm's (the CPU profile, unless MLX_DGEMMA_LIBM=1)."""
    return backend.current().fast_math


# --- lanes: the vocabulary-sized passes split across CPU threads ---------------------------------------------------
#
# MLX's CPU backend runs each elementwise op and reduction on one thread, so the sampler's passes over the
# B x C x V logits use one core whatever the machine has. Everything after the final norm is independent per
# canvas position, so the positions are split into lanes, one CPU stream (one worker thread) each; the halves of a
# 2-core machine then run side by side. The GPU has no use for this: there, one lane on the default stream.

_local = threading.local()  # MLX streams belong to the thread that made them
CHUNK = int(os.environ.get("MLX_DGEMMA_CHUNK", 32))


def lanes() -> list:
    """This thread's CPU streams for the per-position work: one per core (MLX_DGEMMA_LANES overrides), or [None]
    (the default stream) on one core."""
    if getattr(_local, "lanes", None) is None:
        n = int(os.environ.get("MLX_DGEMMA_LANES", 0)) or min(os.cpu_count() or 1, 8)
        _local.lanes = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else [None]
    return _local.lanes


def lane_slices(n: int, count: int) -> list[slice]:
    """`count` contiguous slices covering range(n), sizes differing by at most one (no empty slice)."""
    count = max(1, min(count, n))
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def map_positions(n: int, build, chunk: int | None = None) -> list:
    """`build(positions)` for consecutive slices covering range(n), each built on its lane's stream.

    On the CPU the positions go in chunks of about `chunk` (default CHUNK), dealt to the lanes in turn: MLX
    evaluates one chunk's chain of vocabulary-sized intermediates before the next, so the step's peak memory
    follows the chunk, not the canvas. Without lanes (the GPU profile): one slice, the default stream.
    """
    if not backend.current().lanes:
        return [build(slice(0, n))]
    streams = lanes()
    out = []
    for i, rows in enumerate(lane_slices(n, max(len(streams), -(-n // (chunk or CHUNK))))):
        stream = streams[i % len(streams)]
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            out.append(build(rows))
    return out
