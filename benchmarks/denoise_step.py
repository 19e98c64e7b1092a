"""The public decoder step beside the generation loop's own, on the bench checkpoint, in one process.

    python benchmarks/denoise_step.py [--checkpoint DIR] [--repeats N]

* `denoise(logits)`: `model.denoise(canvas, cache, self_conditioning_logits=...)`, what a caller of the public API
  runs (self-conditioning from the previous step's logits, the soft-capped float32 logits out);
* `denoise(probs)`: the same with `self_conditioning_probs=` (the probabilities computed once, outside);
* `before`: what `denoise(logits)` ran until it took the loop's path (`mx.softmax`, then as `denoise(probs)`);
* `loop step`: what `generate.diffuse` runs per step: `denoise_raw` plus the sampler's statistics (soft-cap,
  tempering, softmax, entropy, argmax, sample) per lane.

Prints medians (ms) and the ratio of each to the loop's step, with the GEMM rate this process got.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def worker(checkpoint: str, repeats: int = 3) -> dict:
    """Runs in the child (OpenBLAS preloaded)."""
    import mlx.core as mx

    import mlx_dgemma
    from mlx_dgemma.generate import lane_statistics

    model, _ = mlx_dgemma.load(checkpoint)
    args = model.args
    cache = model.make_cache()
    model.encode(mx.array([common.bench_prompt(64, args.vocab_size)]), cache)
    canvas = mx.array([common.bench_canvas(args.canvas_length, args.vocab_size)])
    logits = model.denoise(canvas, cache) / 0.8
    probs = mx.softmax(logits, axis=-1)
    mx.eval(cache.state(), logits, probs)
    temp, uniforms = mx.array(0.7), mx.random.uniform(shape=canvas.shape, key=mx.random.key(0))
    previous = lane_statistics(logits, temp, uniforms, args.final_logit_softcapping, model.dtype)
    mx.eval(*previous)

    def loop_step():
        raw = model.denoise_raw(canvas, cache, previous.weights, previous.total)
        mx.eval(*lane_statistics(raw, temp, uniforms, args.final_logit_softcapping, model.dtype))

    fns = {
        "denoise(logits)": lambda: mx.eval(model.denoise(canvas, cache, self_conditioning_logits=logits)),
        "denoise(probs)": lambda: mx.eval(model.denoise(canvas, cache, self_conditioning_probs=probs)),
        # what `denoise(logits)` ran before it took the loop's path: a one-thread softmax, then the probabilities
        "before": lambda: mx.eval(model.denoise(
            canvas, cache, self_conditioning_probs=mx.softmax(logits.astype(mx.float32), axis=-1))),
        "loop step": loop_step,
    }
    gemm = common.print_gemm_rate()
    times = common.time_interleaved(fns, repeats=repeats, warmup=1)
    return dict(gemm=gemm, dtype=str(model.dtype), canvas=args.canvas_length,
                medians={name: statistics.median(t) for name, t in times.items()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="bench checkpoint folder (built on first use)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    checkpoint = common.ensure_bench_checkpoint(a.checkpoint)
    r = common.run_in_subprocess("benchmarks.denoise_step:worker", dict(checkpoint=str(checkpoint), repeats=a.repeats),
                                 python=common.MAIN_PYTHON, preload_openblas=True, timeout=3600)
    base = r["medians"]["loop step"]
    print(f"bench checkpoint {checkpoint}; 64-token prompt, batch 1, canvas {r['canvas']}, {r['dtype']}; {r['gemm']}")
    for name, ms in r["medians"].items():
        print(f"{name:18s}{ms:9.0f} ms  {ms / base:5.2f}x the loop's step")


if __name__ == "__main__":
    main()
