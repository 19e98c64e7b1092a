"""One process against two ranks (`mlx.launch -n 2`, ring backend on loopback) on the bench checkpoint.

    flock /tmp/heavy.lock env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/distributed.py [--steps 6] [--json out.json] [--by-hand]

For each of: one process, two ranks `--pipeline`, two ranks `--experts-parallel` (exact, then `--partial-sums`), the
same prompt (64 tokens) and one canvas of `--steps` denoising steps (never stopping early), seed 0:

* step time: median wall time of one denoising step on rank 0 (the first step, which compiles, left out);
* bytes per step: what the loopback interface carried during the timed steps (/proc/net/dev, both ranks' sends
  together; other traffic on `lo` at the same time would add to it), next to what the protocol sends by count;
* peak memory per rank (MLX's own accounting) and the weights each rank holds (its parameters' bytes);
* whether the committed tokens equal the single process's.

Then an estimate (not a measurement) for two Macs over Thunderbolt: bytes per step divided by a link bandwidth,
plus a per-collective latency, for the released model's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import bench_prompt, ensure_bench_checkpoint, machine_info, openblas_env  # noqa: E402

RUNS = [("1 process", None), ("2 ranks, --pipeline", "pipeline"), ("2 ranks, --experts-parallel", "experts"),
        ("2 ranks, --experts-parallel --partial-sums", "experts-partial")]
# The estimate's assumptions (see /work/shared/design/vision_and_distributed.md B.2: TCP over a Thunderbolt
# bridge measured ~3 GB/s one way and ~0.2 ms per collective between two Macs).
TB_BYTES_PER_S, TB_LATENCY_S = 3e9, 0.2e-3
RELEASED = dict(hidden=2816, layers=30, canvas=256, itemsize=2, top_k=8)  # bf16 activations


def loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])  # transmitted bytes
    return 0


def gemm_gflops() -> float:
    import mlx.core as mx

    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(5):
        mx.eval(a @ a)
    return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def protocol_bytes(mode: str | None, layers: int, hidden: int, canvas: int, itemsize: int, top_k: int,
                   ranks: int = 2) -> int:
    """Bytes all ranks send per denoising step, by count (ring all_sum: each rank sends 2(N-1)/N of the array)."""
    h = canvas * hidden * itemsize
    all_sum = ranks * 2 * (ranks - 1) / ranks * h
    header = ranks * 2 * (ranks - 1) / ranks * 32
    if mode == "pipeline":  # h along the ranks, then the last rank's h back to rank 0 in one all_sum
        return int(header + (ranks - 1) * h + all_sum)
    if mode == "experts":  # h handed out, then one all_sum per layer of every slot's expert output
        return int(header + all_sum + layers * top_k * all_sum)
    if mode == "experts-partial":  # h handed out, then one all_sum per layer of each rank's weighted sum
        return int(header + (layers + 1) * all_sum)
    return 0


def child(mode: str, folder: str, out_dir: str, steps: int):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dgemma.diffusion import Canvas, Draft, RandomSource, diffuse, prefill, resolve_settings
    from mlx_dgemma.distributed import ShardedModel, load_distributed
    from mlx_dgemma.loading import load_model

    rank = int(os.environ.get("MLX_RANK", "0"))
    gflops = gemm_gflops()

    def report(model, extra):
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))  # what this rank holds
        path = Path(out_dir) / f"rank{rank}.json"
        path.write_text(json.dumps({"rank": rank, "gemm_gflops": gflops, "weights_gb": weights / 1e9,
                                    "peak_gb": mx.get_peak_memory() / 1e9, **extra}))

    if mode == "single":
        model = load_model(folder)
    else:
        serve = ShardedModel.serve

        def serve_and_report(self):
            serve(self)
            report(self, {})

        ShardedModel.serve = serve_and_report
        model, _ = load_distributed(folder, mode.split("-")[0], exact=mode != "experts-partial")  # the other ranks
        # serve, report and exit in here
    settings = resolve_settings(model, dict(max_new_tokens=model.args.canvas_length, max_denoising_steps=steps,
                                            stability_threshold=steps + 1, confidence_threshold=1e-30))
    cache = model.make_cache()
    ids = mx.array([bench_prompt(64, model.args.vocab_size)])
    prefill(model, ids, cache)
    marks, tokens = [time.perf_counter()], None
    sent = []
    for event in diffuse(model, cache, 1, settings, RandomSource(0)):
        if isinstance(event, Draft):
            marks.append(time.perf_counter())
            sent.append(loopback_bytes())
        elif isinstance(event, Canvas):
            tokens = event.tokens.tolist()
    step_ms = [1e3 * (b - a) for a, b in zip(marks[1:], marks[2:])]
    per_step = (sent[-1] - sent[0]) / max(len(sent) - 1, 1)
    if mode != "single":
        model.close()
    report(model, {"step_ms": statistics.median(step_ms), "steps": len(marks) - 1, "lo_bytes_per_step": per_step,
                   "tokens": tokens, "args": {"layers": model.args.num_hidden_layers,
                                              "hidden": model.args.hidden_size, "canvas": model.args.canvas_length,
                                              "vocab": model.args.vocab_size, "top_k": model.args.top_k_experts}})




def run(mode, folder, steps, by_hand: bool = False) -> list[dict]:
    from mlx_dgemma.distributed import free_starting_port

    out = tempfile.mkdtemp(prefix="dist-bench-")
    me = [sys.executable, str(Path(__file__).resolve()), "--child", mode or "single", str(folder), out,
          "--steps", str(steps)]
    env = {**openblas_env(), "PYTHONPATH": str(REPO)}
    if mode is None:
        subprocess.run(me, check=True, env=env, timeout=1800)
    elif by_hand:  # what mlx.launch sets up, without its output threads (they spin a core: BENCHMARKS.md)
        port = free_starting_port()
        hostfile = Path(out) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(2)]))
        ranks = [subprocess.Popen(me, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(2)]
        codes = [p.wait(timeout=1800) for p in ranks]
        if any(codes):
            raise RuntimeError(f"ranks exited with {codes}")
    else:
        launch = str(Path(sys.executable).parent / "mlx.launch")
        cmd = [launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--", *me]
        subprocess.run(cmd, check=True, env=env, timeout=1800)
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint", help="Bench checkpoint folder (built if missing).")
    p.add_argument("--layers", type=int, default=6, help="Layers of the bench checkpoint built (default 6).")
    p.add_argument("--vocab-size", type=int, help="Vocabulary of the bench checkpoint built (default the bench's).")
    p.add_argument("--json", help="Write the results here.")
    p.add_argument("--by-hand", action="store_true",
                   help="Start the two ranks directly (MLX_RANK, MLX_HOSTFILE) instead of with mlx.launch.")
    p.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child, a.steps)
    folder = ensure_bench_checkpoint(a.checkpoint, layers=a.layers,
                                     **({"vocab_size": a.vocab_size} if a.vocab_size else {}))
    results = {label: run(mode, folder, a.steps, a.by_hand) for label, mode in RUNS}
    base = results[RUNS[0][0]][0]
    shape = base["args"]
    print(f"bench checkpoint {folder} ({shape['layers']} layers, hidden {shape['hidden']}, canvas {shape['canvas']}, "
          f"vocab {base['args']['vocab']}, float32); {a.steps} steps, medians of the last {a.steps - 1}; ranks started "
          f"{'by hand' if a.by_hand else 'by mlx.launch'}; machine {machine_info()}")
    print(f"GEMM rate (1024^3 float32, rank 0): {base['gemm_gflops']:.1f} GFLOP/s")
    print("| run | step ms | vs 1 process | loopback bytes/step | protocol bytes/step | weights GB per rank | "
          "peak GB per rank | tokens = 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for label, mode in RUNS:
        ranks = results[label]
        r0 = ranks[0]
        count = protocol_bytes(mode, shape["layers"], shape["hidden"], shape["canvas"], 4, shape["top_k"])
        weights = " / ".join(f"{r['weights_gb']:.2f}" for r in ranks)
        peaks = " / ".join(f"{r['peak_gb']:.2f}" for r in ranks)
        same = "yes" if r0["tokens"] == base["tokens"] else "NO"
        print(f"| {label} | {r0['step_ms']:.0f} | {base['step_ms'] / r0['step_ms']:.2f}x | "
              f"{r0['lo_bytes_per_step'] / 1e6:.2f} MB | {count / 1e6:.2f} MB | {weights} | {peaks} | {same} |")
    print("\nEstimate (not measured): two Macs over Thunderbolt (TCP, ~3 GB/s one way, ~0.2 ms per collective), "
          "the released model (30 layers, hidden 2816, canvas 256, bf16):")
    for label, mode in RUNS[1:]:
        total = protocol_bytes(mode, **RELEASED)
        collectives = 2 + (RELEASED["layers"] + 1 if mode.startswith("experts") else 2)
        one_way = total / 2  # both directions of the link carry half
        ms = 1e3 * (one_way / TB_BYTES_PER_S + collectives * TB_LATENCY_S)
        print(f"  {label}: {total / 1e6:.1f} MB per step ({one_way / 1e6:.1f} MB each way) -> ~{ms:.1f} ms per step "
              f"of communication")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
