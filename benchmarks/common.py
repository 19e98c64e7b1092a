"""Shared benchmark helpers: the bench checkpoint, timing, child processes, peak memory, ratio tables.

Only the standard library is imported at module level, so this file can be imported by any interpreter
(the project venv, the separate mlx-vlm venv) from a child process. ``build_bench_checkpoint`` imports
torch/transformers lazily and therefore needs the project venv (``.venv``: torch 2.13.0, transformers 5.24.0).

    from benchmarks.common import build_bench_checkpoint, run_in_subprocess, time_interleaved, ratio_table

Nothing here reads /work/shared; the bench checkpoint is the tests' `bench` preset (`tests/reference.py`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

#: Where ``build_bench_checkpoint`` puts checkpoints by default (``.cache/`` is git-ignored).
DEFAULT_CACHE_DIR = Path(os.environ.get("MLX_DGEMMA_BENCH_CACHE", REPO_ROOT / ".cache" / "bench"))

#: Interpreter with torch + transformers (the project venv); override with MLX_DGEMMA_MAIN_PYTHON.
MAIN_PYTHON = os.environ.get("MLX_DGEMMA_MAIN_PYTHON") or (
    str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv" / "bin" / "python").exists() else sys.executable
)
#: Interpreter with mlx-vlm installed (kept out of the project venv); override with MLX_DGEMMA_PEERS_PYTHON.
PEERS_PYTHON = os.environ.get("MLX_DGEMMA_PEERS_PYTHON", "/work/peers-venv/bin/python")

#: MLX's CPU wheel is ~50x slower at fp32 GEMM than OpenBLAS on this machine; MLX picks up a preloaded BLAS.
OPENBLAS = os.environ.get("MLX_DGEMMA_OPENBLAS", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")

# ---------------------------------------------------------------------------------------------------------------
# The bench checkpoint
# ---------------------------------------------------------------------------------------------------------------

sys.path.insert(0, str(REPO_ROOT / "tests"))
from reference import PRESETS, build_reference, layer_pattern  # noqa: E402  (standard library only at import)

if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
from benchmarks import blas  # noqa: E402  (standard library only at import)

#: The released model's proportions at a size this CPU can time: the tests' `bench` preset (`tests/reference.py`),
#: whose layer pattern follows the layer count, plus the weights' dtype.
BENCH_PRESET: Dict[str, Any] = {**{k: v for k, v in PRESETS["bench"].items() if k != "layer_types"}, "dtype": "float32"}
bench_layer_types = layer_pattern  # 5 sliding : 1 full, the last layer full

_MARKER = "bench_checkpoint.json"


def bench_params(layers: int = 6, seed: int = 0, **overrides) -> Dict[str, Any]:
    """The full parameter set of a bench checkpoint (what ``build_bench_checkpoint`` records in its marker)."""
    unknown = set(overrides) - set(BENCH_PRESET)
    if unknown:
        raise TypeError(f"unknown bench checkpoint override(s): {sorted(unknown)}")
    p = dict(BENCH_PRESET)
    p.update(overrides)
    p["layer_types"] = bench_layer_types(int(layers))
    p["seed"] = int(seed)
    return p


def _checkpoint_complete(out: Path, params: Mapping[str, Any]) -> bool:
    marker = out / _MARKER
    if not marker.is_file() or not (out / "config.json").is_file():
        return False
    if not (list(out.glob("*.safetensors")) or (out / "model.safetensors.index.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(dict(params)))
    except (OSError, ValueError):
        return False


def build_bench_checkpoint(out_dir, layers: int = 6, seed: int = 0, force: bool = False, **overrides) -> Path:
    """Build (or reuse) a random DiffusionGemma checkpoint with the bench preset's proportions.

    Written by transformers' own ``save_pretrained`` (DiffusionGemmaForBlockDiffusion), so its config.json,
    generation_config.json and weight names are those of a real Hugging Face DiffusionGemma checkpoint.
    Norm weights and router scales get +0.1*N(0,1) and every ``layer_scalar`` is 0.9, so a port that ignores
    them is visible. ``overrides`` replace entries of ``BENCH_PRESET`` (e.g. ``vocab_size=4096``,
    ``dtype="bfloat16"``). The checkpoint is reused when ``out_dir`` already holds one built with the same
    parameters (recorded in ``bench_checkpoint.json``); ``force=True`` rebuilds. Needs torch + transformers.
    """
    out = Path(out_dir)
    params = bench_params(layers, seed, **overrides)
    if not force and _checkpoint_complete(out, params):
        return out

    if params["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, not {params['dtype']!r}")

    # Build into a sibling temp dir and move it in place, so an interrupted build is never mistaken for a cache hit.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        build_reference(tmp, preset="bench", seed=params["seed"], dtype=params["dtype"],
                        **{k: v for k, v in params.items() if k not in ("seed", "dtype")})
        (tmp / _MARKER).write_text(json.dumps(dict(params), indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_checkpoint_dir(layers: int = 6, seed: int = 0, **overrides) -> Path:
    """A stable cache path for a bench checkpoint with these parameters."""
    tag = f"bench-l{layers}-s{seed}"
    for k in sorted(overrides):
        tag += f"-{k}{overrides[k]}"
    return DEFAULT_CACHE_DIR / tag


def ensure_bench_checkpoint(checkpoint=None, layers: int = 6, seed: int = 0, **overrides) -> Path:
    """Return a bench checkpoint path, building it if needed (in a child process with ``MAIN_PYTHON``).

    A given ``checkpoint`` that already holds a config.json and weights is used as it is (whatever it was built
    with); a missing one is built with ``layers``/``seed``/``overrides``.
    """
    out = Path(checkpoint) if checkpoint else default_checkpoint_dir(layers, seed, **overrides)
    if checkpoint and (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    if _checkpoint_complete(out, bench_params(layers, seed, **overrides)):
        return out
    run_in_subprocess(
        "benchmarks.common:_build_worker",
        dict(out_dir=str(out), layers=layers, seed=seed, **overrides),
        python=MAIN_PYTHON,
        timeout=1800,
    )
    return out


def _build_worker(out_dir, layers=6, seed=0, **overrides):
    t = time.perf_counter()
    path = build_bench_checkpoint(out_dir, layers=layers, seed=seed, **overrides)
    return {"checkpoint": str(path), "seconds": round(time.perf_counter() - t, 1)}


def bench_token_ids(n: int, vocab_size: int, seed: int = 0, low: int = 3, high_margin: int = 16) -> List[int]:
    """``n`` deterministic pseudo-random token ids in [low, vocab_size - high_margin), the same in every venv.

    Skips pad/eos/bos (0-2) and the image/boi/eoi ids at the top of the vocabulary. Pure Python (a 64-bit LCG),
    so torch, MLX and NumPy users get identical prompts and canvases.
    """
    span = vocab_size - high_margin - low
    state = (seed * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
    out = []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out.append(low + (state >> 33) % span)
    return out


def bench_prompt(prompt_len: int = 64, vocab_size: int = 262_144, seed: int = 0) -> List[int]:
    """The benchmark prompt: ``prompt_len`` ids (batch 1)."""
    return bench_token_ids(prompt_len, vocab_size, seed=seed)


def bench_canvas(canvas_length: int = 256, vocab_size: int = 262_144, seed: int = 0) -> List[int]:
    """A fixed random canvas for timing a single decoder step."""
    return bench_token_ids(canvas_length, vocab_size, seed=seed + 1_000_003, low=0, high_margin=0)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in milliseconds. ``fn`` must synchronise itself (mx.eval / .item() / ...)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_call_cpu(fn: Callable[[], Any]) -> Tuple[float, float]:
    """(wall ms, process CPU ms) of one call. CPU time counts all threads of this process; when the machine
    is shared, wall time inflates with the contention while CPU time mostly does not."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: Union[int, Mapping[str, int]] = 1,
    per_round: Optional[Mapping[str, int]] = None,
    cpu_out: Optional[Dict[str, List[float]]] = None,
) -> Dict[str, List[float]]:
    """Time several functions in interleaved rounds; return the wall milliseconds of every timed call per name.

    First the warmup calls (``warmup``: calls per function, an int for all or a dict per name), untimed.
    Then ``repeats`` rounds; in each, every function is called ``per_round[name]`` times (default 1), and the
    order of the functions rotates from round to round. Interleaving spreads slow drifts of the machine
    (thermal, other processes) over all the measured functions alike; take ``statistics.median`` (or
    ``summarize``) of each list. When ``cpu_out`` is a dict it receives the process CPU milliseconds too.
    """
    names = list(fns)
    per = {n: int((per_round or {}).get(n, 1)) for n in names}
    warm = {n: int(warmup.get(n, 0) if isinstance(warmup, Mapping) else warmup) for n in names}
    for n in names:
        for _ in range(warm[n]):
            fns[n]()
    out: Dict[str, List[float]] = {n: [] for n in names}
    if cpu_out is not None:
        for n in names:
            cpu_out.setdefault(n, [])
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for _ in range(per[name]):
                wall, cpu = time_call_cpu(fns[name])
                out[name].append(wall)
                if cpu_out is not None:
                    cpu_out[name].append(cpu)
    return out


def loadavg() -> Optional[List[float]]:
    """The 1/5/15-minute load averages (Linux), or None. Above the core count, timings are contended."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def summarize(samples_ms: Sequence[float]) -> Dict[str, Any]:
    """median / min / max / relative spread ((max-min)/median) of a list of milliseconds."""
    s = list(samples_ms)
    if not s:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0, "samples": []}
    med = statistics.median(s)
    return {
        "median": round(med, 2),
        "min": round(min(s), 2),
        "max": round(max(s), 2),
        "spread": round((max(s) - min(s)) / med, 4) if med else None,
        "n": len(s),
        "samples": [round(x, 2) for x in s],
    }


def self_peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)


def machine_info() -> Dict[str, Any]:
    """A short description of the machine for result files."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------------------------
# Running a function in a fresh child process
# ---------------------------------------------------------------------------------------------------------------


class ChildError(RuntimeError):
    """A child benchmark process failed; ``.result`` holds what could be collected."""

    def __init__(self, message: str, result: Dict[str, Any]):
        super().__init__(message)
        self.result = result


def openblas_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A copy of ``env`` (default os.environ) with OpenBLAS added to LD_PRELOAD (if the library exists)."""
    e = dict(os.environ if env is None else env)
    if OPENBLAS and Path(OPENBLAS).exists():
        pre = [x for x in e.get("LD_PRELOAD", "").split(":") if x]
        if OPENBLAS not in pre:
            pre.insert(0, OPENBLAS)
        e["LD_PRELOAD"] = ":".join(pre)
        e = blas.apply_override(e)  # OPENBLAS_CORETYPE where the library misdetects an AVX-512 CPU
    return e


def print_gemm_rate(file=None) -> str:
    """Print (and return) the float32 GEMM rate this process gets (imports mlx)."""
    line = blas.describe()
    print(line, file=file or sys.stderr, flush=True)
    return line


def run_in_subprocess(
    target: str,
    kwargs: Optional[Mapping[str, Any]] = None,
    *,
    python: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    preload_openblas: bool = False,
    timeout: Optional[float] = None,
    echo: bool = True,
) -> Dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a fresh interpreter and return its JSON-able dict result.

    The child runs with the repository root and ``benchmarks/`` on ``sys.path`` and its working directory at the
    repository root, so ``target`` may be ``"benchmarks.peers:reference_worker"``. The function must return a
    JSON-serialisable dict. Added to the result:

    * ``peak_rss_mb``: the child's peak resident set size (from ``os.wait4``'s rusage of that very child,
      which covers the whole process: model load, weights, activations),
    * ``child_wall_s``: the child's wall time, start-up and imports included,
    * ``python``: the interpreter used.

    ``preload_openblas`` puts OpenBLAS into LD_PRELOAD (needed for fast fp32 MLX matmuls on this CPU). The
    child's stderr (and any stdout) is passed through when ``echo`` is set. Raises ``ChildError`` on a non-zero
    exit or a missing result.
    """
    py = python or sys.executable
    e = openblas_env(env) if preload_openblas else dict(os.environ if env is None else env)
    e.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        result_path = Path(tmp) / "result.json"
        log_path = Path(tmp) / "log.txt"
        bootstrap = (
            "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from benchmarks.common import _child_main; _child_main(sys.argv[3], sys.argv[4], sys.argv[5])"
        )
        cmd = [py, "-c", bootstrap, str(REPO_ROOT), str(BENCH_DIR), target, json.dumps(dict(kwargs or {})),
               str(result_path)]
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=e, stdout=log, stderr=subprocess.STDOUT)
            deadline = None if timeout is None else time.monotonic() + timeout
            status, rusage, timed_out = None, None, False
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    _, status, rusage = os.wait4(proc.pid, 0)
                    timed_out = True
                    break
                time.sleep(0.05)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log_text = log_path.read_text(errors="replace")
        if echo and log_text.strip():
            sys.stderr.write(log_text if log_text.endswith("\n") else log_text + "\n")
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {}
        kb = rusage.ru_maxrss if rusage is not None else 0
        result.update(
            peak_rss_mb=round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1),
            child_wall_s=round(wall, 1),
            python=py,
        )
        if timed_out or proc.returncode != 0 or "error" in result:
            why = "timed out" if timed_out else f"exit status {proc.returncode}"
            result.setdefault("log_tail", log_text[-4000:])
            raise ChildError(f"{target} failed ({why}): {result.get('error', log_text[-1500:])}", result)
        return result


def _child_main(target: str, kwargs_json: str, result_path: str) -> None:
    """Entry point of the child process started by ``run_in_subprocess``."""
    import importlib
    import traceback

    module_name, _, func_name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
        result = fn(**json.loads(kwargs_json))
        if not isinstance(result, dict):
            result = {"result": result}
        code = 0
    except BaseException as exc:  # report, then fail
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        traceback.print_exc()
        code = 1
    Path(result_path).write_text(json.dumps(result, default=_json_default))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (slow with large frameworks loaded)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio_table(
    rows: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str],
    baseline: Optional[str] = None,
    lower_is_better: Optional[Mapping[str, bool]] = None,
    digits: int = 1,
) -> str:
    """A Markdown table: one row per system, one column per metric, plus "x baseline" ratio columns.

    ``rows`` maps a system name to a dict of metric values (numbers or None). For each metric a second column
    shows ``baseline / value`` when lower is better (ms, MB: >1 means faster/smaller than the baseline) and
    ``value / baseline`` when higher is better (tok/s). ``lower_is_better`` defaults to True for every metric
    except those whose name ends in ``tok_s``/``tps``. Without a ``baseline`` only the values are shown.
    """
    lib = dict(lower_is_better or {})
    for m in metrics:
        lib.setdefault(m, not (m.endswith("tok_s") or m.endswith("tps")))
    head = ["system"]
    for m in metrics:
        head.append(m)
        if baseline:
            head.append(f"{m} (x {baseline})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    base = rows.get(baseline, {}) if baseline else {}
    for name, vals in rows.items():
        cells = [name]
        for m in metrics:
            v = vals.get(m)
            cells.append(_fmt(v, digits))
            if baseline:
                b = base.get(m)
                if isinstance(v, (int, float)) and isinstance(b, (int, float)) and v and b:
                    r = (b / v) if lib[m] else (v / b)
                    cells.append(f"{r:.2f}x")
                else:
                    cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_ratio_table(rows, metrics, baseline=None, lower_is_better=None, digits=1, file=None) -> None:
    """Print ``ratio_table(...)``."""
    print(ratio_table(rows, metrics, baseline, lower_is_better, digits), file=file or sys.stdout)


def main(argv: Optional[Iterable[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build (or reuse) the bench-preset DiffusionGemma checkpoint.")
    ap.add_argument("out_dir", nargs="?", help=f"default: under {DEFAULT_CACHE_DIR}")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, dest="vocab_size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    ov = {k: v for k, v in (("vocab_size", a.vocab_size), ("dtype", a.dtype)) if v is not None}
    out = a.out_dir or default_checkpoint_dir(a.layers, a.seed, **ov)
    t = time.perf_counter()
    path = build_bench_checkpoint(out, layers=a.layers, seed=a.seed, force=a.force, **ov)
    print(json.dumps({"checkpoint": str(path), "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
