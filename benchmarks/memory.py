"""Memory at run time on the bench checkpoint: generation peak = weights + one step, and chunked prefill.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/memory.py
    python benchmarks/memory.py --weights fp32 q4 --prompts 512 4096 --json out.json

The bench checkpoint (6 layers, `tests/reference.py`'s `bench` preset, float32) is built into
`.cache/bench-convert/l6` if missing (shared with benchmarks/convert.py), and converted to 8-bit and to the mixed
4-bit recipe next to it. Every measurement runs in a fresh interpreter and reports MLX's own accounting
(`mx.get_active_memory` after loading = the weights, `mx.get_peak_memory` during the run) and the process's RSS
high-water mark (VmHWM, which also counts the interpreter and libraries).

* generation: one prompt of 64 tokens, one canvas of 256 tokens, `--steps` denoising steps (the first plain, the
  next self-conditioned; float32 is run again with `--also-steps` to show the peak does not grow with steps).
  MLX's CPU kernels for quantized matmuls are slow (minutes per step on this machine), hence 2 steps by default.
* prefill: prompts of each `--prompts` length encoded with `--prefill-step-size` (default 512), and once in one
  piece for comparison; the peak above the weights is split into the KV cache left behind and the transient
  working set of one chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from convert import CACHE, ensure_checkpoint, status_kib  # noqa: E402  (this folder's convert.py)

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
QUANTIZED = {"q8": dict(quantize=True, q_bits=8), "q4": dict(quantize=True, q_bits=4)}
LABELS = {"fp32": "float32", "q8": "8-bit", "q4": "4-bit mixed"}


def ensure_weights(kind: str) -> Path:
    source = ensure_checkpoint(6)
    if kind == "fp32":
        return source
    out = CACHE / f"l6-{kind}"
    if not (out / "config.json").is_file():
        code = (f"import mlx_dgemma; mlx_dgemma.convert({str(source)!r}, {str(out)!r}, verbose=False, "
                f"**{QUANTIZED[kind]!r})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    state, out = seed, []
    for _ in range(n):  # a 64-bit LCG: the same ids everywhere
        state = (state * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out.append(3 + (state >> 33) % (vocab - 19))
    return out


def tree_bytes(tree) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(tree))


def child(spec: dict) -> None:
    import mlx.core as mx

    import mlx_dgemma
    from mlx_dgemma.diffusion import prefill

    mx.set_default_device(mx.cpu)
    model, _ = mlx_dgemma.load(spec["folder"])
    weights = tree_bytes(model.parameters())
    mx.clear_cache()
    loaded = mx.get_active_memory()
    result = {"weights_bytes": weights, "active_after_load": loaded, "rss_after_load": 1024 * status_kib("VmRSS")}
    vocab = model.args.vocab_size
    if spec["task"] == "generate":
        ids = prompt_ids(64, vocab)
        mx.reset_peak_memory()
        start = time.perf_counter()
        tokens = mlx_dgemma.generate_tokens(model, [ids], max_tokens=model.args.canvas_length, seed=0,
                                            max_denoising_steps=spec["steps"])
        result.update(seconds=time.perf_counter() - start, tokens=len(tokens[0]), peak=mx.get_peak_memory(),
                      hwm=1024 * status_kib("VmHWM"))
    else:
        ids = mx.array([prompt_ids(spec["length"], vocab)])
        cache = model.make_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        prefill(model, ids, cache, None, spec["step"])
        seconds = time.perf_counter() - start
        result.update(seconds=seconds, peak=mx.get_peak_memory(), cache_bytes=tree_bytes(cache.state()),
                      hwm=1024 * status_kib("VmHWM"))
    print(json.dumps(result))


def run_child(spec: dict, preload: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if preload and Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = ":".join([OPENBLAS] + [x for x in env.get("LD_PRELOAD", "").split(":") if x and x != OPENBLAS])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: failed\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(x) -> str:
    return f"{x / 1e9:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["fp32", "q8", "q4"], choices=list(LABELS))
    p.add_argument("--steps", type=int, default=2,
                   help="Denoising steps per generation run (a plain step, then self-conditioned ones). Default: 2.")
    p.add_argument("--also-steps", type=int, default=8,
                   help="Also run float32 generation with this many steps (the peak must not grow). 0: skip.")
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--prefill-weights", default="fp32", choices=list(LABELS))
    p.add_argument("--no-openblas", action="store_true", help="Do not preload OpenBLAS into the children.")
    p.add_argument("--json", help="Also write the results here.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    preload = not args.no_openblas

    gen = []
    runs = [(kind, args.steps) for kind in args.weights] + ([("fp32", args.also_steps)] if args.also_steps else [])
    for kind, steps in runs:
        r = run_child({"task": "generate", "folder": str(ensure_weights(kind)), "steps": steps}, preload)
        r.update(weights=kind, steps=steps)
        gen.append(r)
        print(f"generate {LABELS[kind]:<12} {steps} steps  weights {gb(r['weights_bytes'])} GB  peak {gb(r['peak'])} GB  "
              f"step working set {gb(r['peak'] - r['active_after_load'])} GB  RSS peak {gb(r['hwm'])} GB  "
              f"{r['seconds']:.1f} s", flush=True)

    pre = []
    folder = str(ensure_weights(args.prefill_weights))
    runs = [(n, args.prefill_step_size) for n in args.prompts] + [(max(args.prompts), max(args.prompts))]
    for length, step in runs:
        r = run_child({"task": "prefill", "folder": folder, "length": length, "step": step}, preload)
        r.update(length=length, step=step)
        pre.append(r)
        transient = r["peak"] - r["active_after_load"] - r["cache_bytes"]
        print(f"prefill {length:>5} tokens, chunks of {step:>5}: peak above weights {gb(r['peak'] - r['active_after_load'])} GB"
              f" = KV cache {gb(r['cache_bytes'])} + working set {gb(transient)} GB  RSS peak {gb(r['hwm'])} GB  "
              f"{r['seconds']:.1f} s", flush=True)

    print("\n| weights | denoising steps | weight bytes GB | MLX peak during generation GB | peak - weights GB "
          "| process RSS peak GB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in gen:
        print(f"| {LABELS[r['weights']]} | {r['steps']} | {gb(r['weights_bytes'])} | {gb(r['peak'])} | "
              f"{gb(r['peak'] - r['active_after_load'])} | {gb(r['hwm'])} | {r['seconds']:.1f} |")
    print(f"\n| prompt tokens | prefill step | MLX peak above weights GB | KV cache GB | working set GB | process RSS peak GB "
          f"| seconds |  ({LABELS[args.prefill_weights]} weights)")
    print("|---|---|---|---|---|---|---|")
    for r in pre:
        above = r["peak"] - r["active_after_load"]
        print(f"| {r['length']} | {r['step']} | {gb(above)} | {gb(r['cache_bytes'])} | {gb(above - r['cache_bytes'])} "
              f"| {gb(r['hwm'])} | {r['seconds']:.1f} |")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "openblas": preload,
               "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"\n{machine}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "generate": gen, "prefill": pre}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
