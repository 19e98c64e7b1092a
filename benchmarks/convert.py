"""Converter benchmark: peak resident memory and throughput of `mlx_dgemma.convert` on the bench preset.

    python benchmarks/convert.py                      # 6 and 12 layers, fp32 -> bf16 / 8-bit / 4-bit mixed
    python benchmarks/convert.py --layers 6 --json out.json

The bench checkpoints (the released model's proportions: vocabulary 262144, 32 experts, 5:1 sliding/full layers)
are written by the reference (`tests/reference.py`, transformers + torch) into `.cache/bench-convert/` the first
time. Every conversion runs in a fresh interpreter; its peak RSS is the kernel's high-water mark for that child
(`os.wait4` rusage, cross-checked with the child's own `/proc/self/status` VmHWM). The bound checked is the
issue's: peak RSS <= 1.5 x the largest single source tensor + 0.5 GB (GB = 1e9 bytes), and it should not grow
with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench-convert"
JOBS = {  # label -> converter keyword arguments
    "fp32 -> bf16": dict(dtype="bfloat16"),
    "fp32 -> 8-bit": dict(quantize=True, q_bits=8),
    "fp32 -> 4-bit mixed": dict(quantize=True, q_bits=4),
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(spec: dict) -> None:
    """Runs in the fresh interpreter: one conversion, then a JSON line with its timing and memory."""
    import mlx.core as mx

    from mlx_dgemma.convert import convert

    mx.set_default_device(mx.cpu)
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    convert(spec["source"], spec["out"], verbose=False, **spec["kwargs"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "hwm_kib": status_kib("VmHWM")}))


def ensure_checkpoint(layers: int) -> Path:
    out = CACHE / f"l{layers}"
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    tmp = CACHE / f".l{layers}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from reference import build_reference; "
            f"build_reference({str(tmp)!r}, preset='bench', layers={layers})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    tmp.rename(out)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def largest_tensor(folder: Path) -> tuple[str, int]:
    sys.path.insert(0, str(REPO))
    from mlx_dgemma.weights import list_tensors

    t = max(list_tensors(folder), key=lambda t: t.nbytes)
    return t.name, t.nbytes


def run_job(source: Path, label: str, kwargs: dict, work: Path) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"source": str(source), "out": str(out), "kwargs": kwargs}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wall = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stdout = proc.stdout.read()  # the child writes little to either pipe
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so this child's own rusage is available
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: conversion failed\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(label=label, wall_seconds=wall, output_bytes=folder_bytes(out))
    result["rusage_maxrss_kib"] = usage.ru_maxrss
    shutil.rmtree(out)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    p.add_argument("--json", help="Also write the results here.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    rows = []
    for layers in args.layers:
        source = ensure_checkpoint(layers)
        name, largest = largest_tensor(source)
        source_bytes = folder_bytes(source)
        bound = 1.5 * largest + 0.5e9
        for label, kwargs in JOBS.items():
            r = run_job(source, label, kwargs, CACHE)
            peak = 1024 * max(r["rusage_maxrss_kib"], r["hwm_kib"])
            r.update(layers=layers, source_bytes=source_bytes, largest_tensor=name, largest_bytes=largest,
                     peak_rss_bytes=peak, bound_bytes=bound, within_bound=peak <= bound)
            rows.append(r)
            print(f"{layers:>2} layers  {label:<20} in {source_bytes / 1e9:5.2f} GB  out {r['output_bytes'] / 1e9:5.2f} GB  "
                  f"{r['seconds']:6.1f} s  {source_bytes / 1e9 / r['seconds']:5.2f} GB/s read  "
                  f"peak RSS {peak / 1e9:5.2f} GB (after imports {1024 * r['baseline_kib'] / 1e9:4.2f})  "
                  f"bound {bound / 1e9:4.2f} GB  {'ok' if peak <= bound else 'EXCEEDED'}", flush=True)

    print("\n| layers | conversion | source GB | output GB | seconds | GB/s (read) | GB/s (written) | peak RSS GB "
          "| RSS after imports GB | largest tensor GB | bound GB | within |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['label']} | {r['source_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} "
              f"| {r['seconds']:.1f} | {r['source_bytes'] / 1e9 / r['seconds']:.2f} "
              f"| {r['output_bytes'] / 1e9 / r['seconds']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} "
              f"| {1024 * r['baseline_kib'] / 1e9:.2f} | {r['largest_bytes'] / 1e9:.2f} | {r['bound_bytes'] / 1e9:.2f} "
              f"| {'yes' if r['within_bound'] else 'NO'} |")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"\n{machine}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
