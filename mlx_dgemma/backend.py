"""The device-specific choices, made once: which of `cpu.py`'s tunings run, and how memory is handled.

MLX runs the same graph on its CPU backend, on Metal and on CUDA, but what is fast differs. On the CPU (see
`cpu.py` for the measurements): the per-position work split over one stream per core ("lanes"), exp and tanh as
polynomials in compiled kernels, the routed experts in blocks of rows of one expert, and a buffer cache as large
as Metal's. On a GPU: one stream, the backend's own exp/tanh, the experts by rows sorted by expert (one gathered
matmul reading each expert's weights once), and, on Metal, the model's memory wired during generation as
mlx-lm does for large models. None of these changes results beyond float32 rounding.

The profile is picked from the default device the first time it is asked for (`load` asks), unless
`MLX_DGEMMA_PROFILE=cpu|gpu` or `use()` chose one; the tests run the parity suite under both on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Profile:
    name: str
    lanes: bool  # per-position work (soft-cap, sampler statistics) over one CPU stream per core, in chunks
    fast_math: bool  # polynomial exp / rational tanh in compiled kernels instead of the backend's
    blocked_experts: bool  # experts as blocks of rows of one expert (CPU) instead of rows sorted by expert (GPU)
    keep_buffers: bool  # MLX's CPU buffer cache raised to the memory limit (Metal's default)
    wire_memory: bool  # wire the model's weights during generation (Metal; `wired_memory`)
    # The fewest positions a compacted fast-sampler step computes (`compact.bucket`). On the CPU a step over 16
    # positions costs about what one over 4 does (the LM head's read of the embedding dominates); on a GPU the
    # routed experts' weight reads fall with fewer positions (16 positions read ~82 of 128 experts a layer, 4
    # read ~29; `benchmarks/break_even.py`, an estimate), so the GPU profile goes down to 4.
    smallest_bucket: int = 16

    def expert_block(self, rows: int, experts: int) -> int:
        """Rows per block for the blocked experts, from the shape alone (`rows` (token, expert) pairs over
        `experts`): each expert's rows are padded to a multiple of the block, so a small step pays for padding
        and a large one for thin products. On the 2-core x86 CPU (bench checkpoint, hidden 1024, 32 experts
        of 256, process CPU time per layer): 16-row blocks took 27/40/104 ms at 16/48/128 tokens against
        38/68/139 ms for 32-row ones, and 112 against 105 ms at 256 tokens (64 rows per expert)."""
        return 16 if rows < 48 * experts else 32


CPU = Profile("cpu", lanes=True, fast_math=True, blocked_experts=True, keep_buffers=True, wire_memory=False)
GPU = Profile("gpu", lanes=False, fast_math=False, blocked_experts=False, keep_buffers=False, wire_memory=True,
              smallest_bucket=4)
PROFILES = {p.name: p for p in (CPU, GPU)}

_active: Profile | None = None


def _cpu_profile() -> Profile:
    # The environment switches `cpu.py` has always read, for measuring one tuning at a time.
    return Profile(
        "cpu", lanes=True, fast_math=not os.environ.get("MLX_DGEMMA_LIBM"), blocked_experts=True,
        keep_buffers=os.environ.get("MLX_DGEMMA_CPU_CACHE") != "0", wire_memory=False,
    )


def resolve(profile: str | Profile | None = None) -> Profile:
    """A profile by name (or as given); None: MLX_DGEMMA_PROFILE, else the one for the default device."""
    if isinstance(profile, Profile):
        return profile
    name = profile or os.environ.get("MLX_DGEMMA_PROFILE") or ("cpu" if mx.default_device() == mx.cpu else "gpu")
    if name not in PROFILES:
        source = "MLX_DGEMMA_PROFILE" if profile is None else "profile"
        raise ValueError(f"{source}={name!r}: expected one of {sorted(PROFILES)}")
    return _cpu_profile() if name == "cpu" else PROFILES[name]


def current() -> Profile:
    """The active profile (picked on first use, then kept)."""
    global _active
    if _active is None:
        _active = resolve()
    return _active


def use(profile: str | Profile | None) -> Profile | None:
    """Make `profile` the active one (None: pick again on next use); returns the previous choice."""
    global _active
    previous, _active = _active, (None if profile is None else resolve(profile))
    return previous


@contextlib.contextmanager
def using(profile: str | Profile):
    previous = use(profile)
    try:
        yield current()
    finally:
        use(previous)


def on_cpu() -> bool:
    """Whether arrays live on MLX's CPU backend, a fact of the device rather than a tuning: its gathered matmul
    takes float32 only (see `switch.widen_cpu_experts`)."""
    return mx.default_device() == mx.cpu


def metal_available() -> bool:
    return bool(getattr(mx, "metal", None)) and mx.metal.is_available()


@contextlib.contextmanager
def wired_memory(model):
    """Wire the model's weights for the duration of a generation on Metal (macOS 15+), so the OS does not page
    them out between steps; elsewhere, or when the profile says not to, nothing.

    As mlx-lm does for large models: the wired limit is raised to the GPU's recommended working set (the most
    Metal keeps resident), and a model larger than 90% of it gets a warning, since it will be slow. The previous
    limit is restored afterwards, after the outstanding work has finished.
    """
    if not current().wire_memory or not metal_available():
        yield
        return
    from mlx.utils import tree_reduce

    limit = int(mx.device_info().get("max_recommended_working_set_size", 0))
    if not limit:
        yield
        return
    size = tree_reduce(lambda total, a: total + a.nbytes if isinstance(a, mx.array) else total, model, 0)
    if size > 0.9 * limit:
        import warnings

        warnings.warn(
            f"the model needs {size / 2**30:.1f} GiB, close to this Mac's {limit / 2**30:.1f} GiB of GPU working "
            "set; generation will be slow (a smaller quantization, or `sudo sysctl iogpu.wired_limit_mb=...`, helps)",
            stacklevel=3,
        )
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


def wired(model, events):
    """The iterator `events` (a generation's), consumed with the model's memory wired (see `wired_memory`)."""
    with wired_memory(model):
        yield from events
