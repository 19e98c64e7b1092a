"""OpenBLAS as MLX's CPU BLAS: its core-type detection, and the float32 GEMM rate a process got.

Debian's OpenBLAS 0.3.21 picks its kernels from the CPU model it recognises; on some Xeons with AVX-512 (and on
CPUs newer than it, such as Zen 4) it falls back to a generic or AVX2 kernel: ~32 instead of ~200 GFLOP/s, which
made every MLX timing 2-4x off. `OPENBLAS_CORETYPE=SKYLAKEX` selects the AVX-512 kernels; it is only safe where
the CPU has `avx512f`, so it is set only there, and only when the detection did not already choose an AVX-512
kernel. The variable is read when the library loads, so it is decided in a child process and applies to the
processes started after (the benchmarks' children, the CI's test run).

    python benchmarks/blas.py --coretype   # prints SKYLAKEX where the override is needed, else nothing
    python benchmarks/blas.py              # prints the GEMM rate of this process (needs mlx)

Only the standard library at module level (mlx is imported by `gemm_rate`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

OPENBLAS = os.environ.get("MLX_DGEMMA_OPENBLAS", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")  # OpenBLAS core names with AVX-512 kernels
OVERRIDE = "SKYLAKEX"

_PROBE = (
    "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.openblas_get_corename.restype = ctypes.c_char_p; "
    "print(lib.openblas_get_corename().decode())"
)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def corename(library: str = OPENBLAS, env: dict | None = None) -> str | None:
    """The core type OpenBLAS chooses when loaded with `env` (None when it cannot be loaded)."""
    if not library or not os.path.exists(library):
        return None
    env = dict(os.environ if env is None else env)
    env.pop("LD_PRELOAD", None)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, library], capture_output=True, text=True, env=env,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def coretype_override(library: str = OPENBLAS, flags: set[str] | None = None, detected: str | None = None) -> str | None:
    """`SKYLAKEX` where the CPU has avx512f but OpenBLAS's own detection chose no AVX-512 kernel, else None.

    A user's own OPENBLAS_CORETYPE is left alone."""
    if os.environ.get("OPENBLAS_CORETYPE"):
        return None
    flags = cpu_flags() if flags is None else flags
    if "avx512f" not in flags:
        return None
    if detected is None:
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        detected = corename(library, env)
    if detected is None or detected.lower() in AVX512_CORES:
        return None
    return OVERRIDE


def apply_override(env: dict) -> dict:
    """`env` with OPENBLAS_CORETYPE set where the detection fails (see `coretype_override`)."""
    fix = coretype_override()
    if fix and not env.get("OPENBLAS_CORETYPE"):
        env = {**env, "OPENBLAS_CORETYPE": fix}
    return env


def gemm_rate(n: int = 1024, repeats: int = 5) -> float:
    """float32 GEMM GFLOP/s of MLX's default device in this process (best of `repeats` n x n x n products)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def describe(n: int = 1024) -> str:
    """One line: the GEMM rate, the device, and which BLAS the process runs."""
    import mlx.core as mx

    rate = gemm_rate(n)
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "openblas" in p]
    blas = "MLX's bundled BLAS"
    if preload and mx.default_device() == mx.cpu:
        core = os.environ.get("OPENBLAS_CORETYPE") or corename(preload[0]) or "?"
        blas = f"OpenBLAS (core {core}{', forced' if os.environ.get('OPENBLAS_CORETYPE') else ''})"
    if mx.default_device() != mx.cpu:
        blas = "the GPU"
    return f"GEMM rate: {rate:.1f} GFLOP/s (float32 {n}^3 on {mx.default_device()}, {blas})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coretype", action="store_true", help="print the OPENBLAS_CORETYPE this CPU needs, if any")
    a = p.parse_args(argv)
    if a.coretype:
        fix = coretype_override()
        if fix:
            print(fix)
        return
    print(describe())


if __name__ == "__main__":
    main()
