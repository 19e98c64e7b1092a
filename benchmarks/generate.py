"""mlx_dgemma beside its peers on the bench checkpoint, in one run: ms per denoising step, generation, memory.

    python benchmarks/generate.py [--checkpoint DIR] [--repeats N] [--peers reference,mlxvlm,mlxlm_ar] [--trace F ...]

The bench checkpoint has the released model's proportions at a size this machine can time (vocabulary 262,144,
canvas 256, 5 sliding : 1 full layers, 32 experts top-8, hidden 1024; built with the reference on first use).
Every contender runs in its own fresh process, one after another, with the same prompt (64 tokens, batch 1),
float32 weights and settings:

* step: one decoder pass (self-conditioning, the layers over the canvas against the cached prompt, head, soft-cap);
* generation: prompt encoding plus one canvas of 256 tokens at a fixed 16 denoising steps (adaptive stopping
  off), sampler included; reported per step and as tokens per second;
* the autoregressive baseline (mlx-lm's gemma4_text with the same backbone) in tokens per second;
* the fast sampler (`sampler="fast"`, `benchmarks/fast_speed.py`): one step at 256/128/64/32/16 live positions
  against the FLOP floor at the GEMM rate the process measured, and, with `--trace`, the per-step live-position
  counts it recorded on a trained canvas-256 model replayed end to end (tokens per second).

It prints a table and the ratios (how many times faster mlx_dgemma is) and writes the raw JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, fast_speed, peers  # noqa: E402

STEPS = 16


def ours_worker(checkpoint: str, prompt_len: int = 64, steps: int = STEPS, repeats: int = 2, step_repeats: int = 3,
                warmup: int = 1, warmup_generate: int = 0, seed: int = 0, **_) -> dict:
    """Runs in the child: time mlx_dgemma's decoder step and a 16-step generation."""
    import mlx.core as mx

    import mlx_dgemma
    from mlx_dgemma.diffusion import DiffusionStats, generate_tokens

    gemm = common.print_gemm_rate()
    t0 = time.perf_counter()
    model, _ = mlx_dgemma.load(checkpoint)
    load_s = time.perf_counter() - t0
    args = model.args
    prompt = common.bench_prompt(prompt_len, args.vocab_size, seed)
    canvas = mx.array([common.bench_canvas(args.canvas_length, args.vocab_size, seed)])
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    first = model.denoise(canvas, cache)
    mx.eval(first, cache.state())
    sc = mx.softmax(first, axis=-1)
    mx.eval(sc)

    def step():
        mx.eval(model.denoise(canvas, cache, self_conditioning_probs=sc))

    info = {}

    def generate():
        stats = DiffusionStats()
        out = generate_tokens(model, [prompt], max_tokens=args.canvas_length, seed=seed, max_denoising_steps=steps,
                              confidence_threshold=1e-30, stats=stats)
        info.update(tokens=len(out[0]), steps=stats.steps, tokens_per_forward=float(stats.tokens_per_forward[0]))

    mx.reset_peak_memory()
    times, cpu, load = peers._timed_rounds(step, generate, repeats, step_repeats, warmup, warmup_generate)
    return dict(
        peer="mlx_dgemma", library=f"mlx_dgemma {mlx_dgemma.__version__}, mlx {mx.__version__}",
        device=str(mx.default_device()), checkpoint=checkpoint, prompt_len=prompt_len, denoising_steps=steps,
        denoising_steps_run=info["steps"], generated_tokens=info["tokens"], load_s=round(load_s, 2),
        step_ms=common.summarize(times["step"]), generate_ms=common.summarize(times["generate"]),
        step_cpu_ms=common.summarize(cpu["step"]), generate_cpu_ms=common.summarize(cpu["generate"]),
        mlx_peak_mb=round(mx.get_peak_memory() / 2**20, 1), loadavg=load, self_peak_rss_mb=common.self_peak_rss_mb(),
        machine=common.machine_info(), gemm=gemm,
    )


def run_ours(checkpoint, **kwargs) -> dict:
    return common.run_in_subprocess("benchmarks.generate:ours_worker", dict(checkpoint=str(checkpoint), **kwargs),
                                    python=common.MAIN_PYTHON, preload_openblas=True, timeout=3600, echo=True)


def per_step(result: dict) -> float | None:
    """Milliseconds per denoising step of a whole generation (prompt encoding and sampler included)."""
    ms = (result.get("generate_ms") or {}).get("median")
    return ms / STEPS if ms else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="bench checkpoint folder (built on first use)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peers", default="reference,mlxvlm,mlxlm_ar")
    p.add_argument("--trace", nargs="+", default=[],
                   help="per-step shapes the fast sampler recorded on a trained canvas-256 model "
                        "(`benchmarks/fast_speed.py record`), replayed on the bench checkpoint; several: one replay each")
    p.add_argument("--out", default=str(common.REPO_ROOT / ".cache" / "bench-generate.json"))
    a = p.parse_args(argv)
    checkpoint = common.ensure_bench_checkpoint(a.checkpoint)
    results = {"mlx_dgemma": run_ours(checkpoint, repeats=a.repeats)}
    results["fast"] = common.run_in_subprocess(
        "benchmarks.fast_speed:fast_worker", dict(checkpoint=str(checkpoint), trace=a.trace, repeats=max(a.repeats, 3)),
        python=common.MAIN_PYTHON, preload_openblas=True, timeout=3600, echo=True)
    for name in [n for n in a.peers.split(",") if n]:
        try:
            results[name] = peers.run_peer(name, checkpoint, repeats=a.repeats)
        except Exception as e:  # a missing peer is reported, not fatal
            print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))

    ours = results["mlx_dgemma"]
    print(f"\nbench checkpoint {checkpoint}; 64-token prompt, batch 1, float32, {STEPS} steps, one 256-token canvas")
    print(f"mlx_dgemma's process: {ours.get('gemm')}")
    print(f"{'':14s}{'decoder step':>14s}{'gen. per step':>15s}{'gen. tok/s':>12s}{'peak RSS':>10s}")
    for name, r in results.items():
        if name in ("mlxlm_ar", "fast"):
            continue
        step = (r.get("step_ms") or {}).get("median")
        gen = (r.get("generate_ms") or {}).get("median")
        tps = 256 / (gen / 1000) if gen else None
        print(f"{name:14s}{step or 0:12.0f}ms{per_step(r) or 0:13.0f}ms{tps or 0:12.1f}{r.get('peak_rss_mb', 0):8.0f}MB")
    if "mlxlm_ar" in results:
        print(f"{'mlxlm_ar':14s}{'':14s}{'':15s}{results['mlxlm_ar'].get('decode_tok_s', 0):12.1f}  (autoregressive)")
    print("\nratios (mlx_dgemma is N x faster):")
    for name in ("reference", "mlxvlm"):
        if name in results:
            r = results[name]
            print(f"  vs {name:10s} decoder step {r['step_ms']['median'] / ours['step_ms']['median']:.2f}x, "
                  f"generation {r['generate_ms']['median'] / ours['generate_ms']['median']:.2f}x")
    if "mlxlm_ar" in results:
        ar = results["mlxlm_ar"]["decode_tok_s"]
        step_s = per_step(ours) / 1000
        print(f"  vs mlxlm_ar  a step costs {step_s * ar:.0f} autoregressive tokens; diffusion wins above that many "
              f"tokens per step (here 16 steps commit 256 tokens: {256 / (ours['generate_ms']['median'] / 1000):.1f} "
              f"tok/s vs {ar:.1f})")

    print_fast(results, checkpoint)


def print_fast(results: dict, checkpoint):
    """The fast sampler's rows: a step by live positions against the FLOP floor, and the replayed workload."""
    from mlx_dgemma.config import ModelArgs

    fast, ours = results["fast"], results["mlx_dgemma"]
    args = ModelArgs.from_file(Path(checkpoint) / "config.json")
    gemm = fast["gemm_gflops"]
    print(f"\nfast sampler (top-64 statistics, gathered self-conditioning, live positions only), GEMM rate "
          f"{gemm:.1f} GFLOP/s float32; floor = FLOPs per step / GEMM rate")
    print(f"{'live positions':>16s}{'ms/step':>10s}{'CPU ms':>9s}{'GFLOP':>8s}{'floor ms':>10s}{'x floor':>9s}")
    for live, t in fast["step_ms_by_live"].items():
        flops = fast_speed.step_flops(args, int(live), 64, 64)
        floor = flops / (gemm * 1e9) * 1e3
        cpu = (fast.get("step_cpu_ms_by_live") or {}).get(live, {}).get("median") or 0
        print(f"{live:>16s}{t['median']:10.0f}{cpu:9.0f}{flops / 1e9:8.1f}{floor:10.0f}{t['median'] / floor:9.2f}")
    ref_flops = fast_speed.step_flops(args, args.canvas_length, 64, args.vocab_size)
    ref_floor = ref_flops / (gemm * 1e9) * 1e3
    ref_cpu = (ours.get("generate_cpu_ms") or {}).get("median", 0) / STEPS
    print(f"{'reference, 256':>16s}{per_step(ours):10.0f}{ref_cpu:9.0f}{ref_flops / 1e9:8.1f}{ref_floor:10.0f}"
          f"{per_step(ours) / ref_floor:9.2f}   (a step of the 16-step generation, sampler included)")
    replays = fast.get("replays") or []
    if not replays:
        print("(no --trace: no replayed workload)")
    for replay in replays:
        print_replay(results, replay)


def print_replay(results: dict, replay: dict):
    """One replayed trace: the fast sampler's tokens per second against the reference sampler's (when the trace
    recorded it) and autoregressive decoding's."""
    ours = results["mlx_dgemma"]
    ref_s = replay["reference_steps"] * per_step(ours) / 1e3
    ref_tps = replay["reference_tokens"] / ref_s if ref_s else 0.0
    print(f"\nreplayed workload ({replay['source']}: {replay['generations']} generations, {replay['tokens']} tokens, "
          f"{replay['steps']} fast steps; random weights never converge, so the bench checkpoint replays the "
          f"per-step live-position counts the fast sampler recorded on the trained model, composed from the "
          f"measured time of each shape; levers {json.dumps(replay.get('levers'), sort_keys=True)})")
    print(f"  fast sampler       {replay['tok_s']:8.1f} tok/s   {replay['visits_per_token']:6.1f} visits/token")
    if ref_tps:
        print(f"  reference sampler  {ref_tps:8.1f} tok/s   {replay['reference_visits_per_token']:6.1f} visits/token   "
              f"(its recorded {replay['reference_steps']} steps x the measured {per_step(ours):.0f} ms/step)")
    if "mlxlm_ar" in results:
        ar = results["mlxlm_ar"]["decode_tok_s"]
        print(f"  mlx-lm autoregressive {ar:5.1f} tok/s   1.0 visits/token")
        print(f"  fast / autoregressive {replay['tok_s'] / ar:.2f}x; fast / reference sampler "
              f"{replay['tok_s'] / ref_tps if ref_tps else 0:.2f}x")


if __name__ == "__main__":
    main()
