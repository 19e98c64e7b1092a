"""The fast sampler's speed on the bench checkpoint: a step at each live-position count, a replayed workload, the
machine's GEMM rate and the FLOP floor. `benchmarks/generate.py` runs it beside the other contenders.

    python benchmarks/fast_speed.py record --model FOLDER --out trace.json   # per-step shapes on a trained model
    python benchmarks/fast_speed.py floor                                     # GEMM rate, FLOPs per step

Random weights never converge, so the bench checkpoint cannot show how many positions stay live step after step.
`record` runs the fast sampler (and the reference sampler) on a trained canvas-256 model over held-out prompts and
writes, per generation, the number of positions each step ran through the decoder (its shape bucket), the
canvases and the emitted tokens. `fast_worker` then times, on the bench checkpoint, one fast step at each live
count and at every shape the trace holds, a canvas's first step, the prompt's encoding and a canvas's encoding,
and replays the recorded workload from those times: the prompt's encoding, every recorded step at its recorded
shape and the encoding of each committed canvas but the last, against the recorded emitted tokens. (Composing
from per-shape times rather than running every step keeps the run short on a shared 2-core machine; a step's cost
depends only on its shape, since every step builds and evaluates its graph afresh.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import blas, common  # noqa: E402

LIVE = (256, 128, 64, 32, 16)


def step_flops(args, positions: int, prefix: int, sc_rows: int | None) -> float:
    """Multiply-add FLOPs of one decoder step over `positions` canvas positions after a `prefix`-token prompt:
    the layers (projections, attention over prompt + canvas, dense MLP, router, the top-k experts), the
    self-conditioning MLP, the LM head, and the soft embedding over `sc_rows` vocabulary rows per position
    (the whole vocabulary for the reference sampler, K for the gathered one)."""
    h, c = args.hidden_size, args.canvas_length
    per = 0.0
    for i, kind in enumerate(args.layer_types):
        d, kv, nh = args.layer_head_dims[i], args.layer_kv_heads[i], args.num_attention_heads
        keys = (min(prefix, args.sliding_window - 1) if kind == "sliding_attention" else prefix) + c
        per += 2 * h * nh * d + 2 * h * kv * d * (2 if kind == "sliding_attention" else 1) + 2 * nh * d * h
        per += 2 * 2 * nh * d * keys
        per += 3 * 2 * h * args.intermediate_size + 2 * h * args.num_experts
        per += args.top_k_experts * 3 * 2 * h * args.moe_intermediate_size
    per += 3 * 2 * h * args.intermediate_size + 2 * h * args.vocab_size + 2 * h * (sc_rows or 0)
    return per * positions


def fast_worker(checkpoint: str, prompt_len: int = 64, live=LIVE, trace: str | None = None, repeats: int = 3,
                seed: int = 0, **_) -> dict:
    """Runs in the child: one fast step at each live count, and the recorded workload replayed."""
    import mlx.core as mx

    import mlx_dgemma
    from mlx_dgemma.compact import needed_positions, scatter_rows
    from mlx_dgemma.config import FastSamplerConfig
    from mlx_dgemma.diffusion import prefill
    from mlx_dgemma.fast_loop import step_outputs
    from mlx_dgemma.sampler import entropy_bound_accept

    model, _ = mlx_dgemma.load(checkpoint)
    args = model.args
    C, V = args.canvas_length, args.vocab_size
    fast = FastSamplerConfig()
    prompt = mx.array([common.bench_prompt(prompt_len, V, seed)])
    canvas = mx.array([common.bench_canvas(C, V, seed)], dtype=mx.int32)
    temp, key = mx.array(0.6), mx.random.key(seed)

    def encoded_prompt():
        cache = model.make_cache()
        prefill(model, prompt, cache)
        return cache

    def step(cache, state, count):
        """A fast step over `count` positions spread over the canvas (state None: a canvas's first step, over
        every position): decoder, top-K statistics, gathered self-conditioning, acceptance among them, the
        canvas state written back; evaluated once, as the loop does."""
        if state is None:
            tokens, soft, buffers = canvas, None, [(None, None)] * len(model.layers)
            positions, valid = mx.arange(C, dtype=mx.int32)[None], mx.ones((1, C), dtype=mx.bool_)
        else:
            tokens, soft, buffers = state
            need = mx.zeros((1, C), dtype=mx.bool_)
            need[:, :: max(C // count, 1)] = True
            positions, valid = needed_positions(need, count)
        ent, am, sample, new_soft, buffers = step_outputs(model, cache, tokens, positions, buffers, soft, temp,
                                                          mx.random.uniform(shape=positions.shape, key=key), fast)
        accept = entropy_bound_accept(mx.where(valid, ent, mx.inf), 0.1) & valid
        tokens = scatter_rows(tokens, positions, valid, mx.where(accept, sample, am))
        soft = scatter_rows(mx.zeros((1, C, new_soft.shape[-1]), new_soft.dtype) if soft is None else soft,
                            positions, valid, new_soft)
        mx.eval(tokens, soft, *[a for kv in buffers for a in kv])
        return tokens, soft, buffers

    cache = encoded_prompt()
    first = step(cache, None, C)
    traces = [trace] if isinstance(trace, str) else list(trace or [])
    recorded = [json.loads(Path(t).read_text()) for t in traces]
    shapes = sorted({int(s) for s in live} | {s for r in recorded for g in r["generations"] for c in g["canvas_shapes"]
                                              for s in c}, reverse=True)
    per_shape, cpu_shape = {}, {}
    for count in shapes:
        step(cache, first, count)  # warm-up: the shape's first graph
        times = [common.time_call_cpu(lambda: step(cache, first, count)) for _ in range(repeats)]
        per_shape[count] = common.summarize([w for w, _ in times])
        cpu_shape[count] = common.summarize([c for _, c in times])
    first_ms = common.summarize([common.time_call(lambda: step(cache, None, C)) for _ in range(repeats)])
    prefill_ms = common.summarize([common.time_call(encoded_prompt) for _ in range(repeats)])

    def encode():
        c = encoded_prompt()
        model.encode(canvas, c)
        mx.eval(c.state())

    encode_ms = max(common.summarize([common.time_call(encode) for _ in range(repeats)])["median"]
                    - prefill_ms["median"], 0.0)
    out = dict(peer="mlx_dgemma fast", step_ms_by_live={str(k): per_shape[k] for k in live},
               step_cpu_ms_by_live={str(k): cpu_shape[k] for k in live},
               step_ms_by_shape={str(k): v["median"] for k, v in per_shape.items()}, first_step_ms=first_ms,
               prefill_ms=prefill_ms, encode_canvas_ms=round(encode_ms, 1), gemm_gflops=round(blas.gemm_rate(), 1),
               loadavg=common.loadavg(), machine=common.machine_info())
    out["replays"] = [replay(r, out) for r in recorded]
    return out


def replay(recorded: dict, timed: dict) -> dict:
    """The recorded generations composed from the measured times: per generation the prompt's encoding, each
    canvas's first step (every position) and its later steps at their recorded shapes, and the encoding of each
    committed canvas but the last; tokens per second against the recorded emitted tokens."""
    shape_ms, total_ms, tokens, steps = timed["step_ms_by_shape"], 0.0, 0, 0
    for g in recorded["generations"]:
        total_ms += timed["prefill_ms"]["median"] + (g["canvases"] - 1) * timed["encode_canvas_ms"]
        for shapes in g["canvas_shapes"]:
            total_ms += timed["first_step_ms"]["median"] + sum(shape_ms[str(s)] for s in shapes[1:])
            steps += len(shapes)
        tokens += g["tokens"]
    gens = recorded["generations"]
    ref_tokens = sum(g.get("reference_tokens", 0) for g in gens)
    return dict(generations=len(gens), tokens=tokens, steps=steps, seconds=round(total_ms / 1e3, 2),
                levers=recorded.get("levers"),
                tok_s=round(tokens / (total_ms / 1e3), 2), source=recorded.get("source"),
                visits_per_token=sum(g["visits"] for g in gens) / max(tokens, 1),
                reference_steps=sum(g.get("reference_steps", 0) for g in gens),
                reference_canvases=sum(g.get("reference_canvases", 0) for g in gens), reference_tokens=ref_tokens,
                reference_visits_per_token=sum(g.get("reference_visits", 0) for g in gens) / max(ref_tokens, 1))


def record(model_folder: str, prompts: list[list[int]], seed: int = 0, source: str = "", weights: str | None = None,
           levers: dict | None = None, reference: bool = True) -> dict:
    """Run the fast sampler (batch 1) on a trained model (`weights`: a training checkpoint's weights over the
    folder's); per generation, each canvas's per-step shapes, and the reference sampler's steps and visits."""
    import mlx.core as mx

    import mlx_dgemma
    from mlx_dgemma.diffusion import Canvas, DiffusionStats, RandomSource, cut_at_eos, diffuse, prefill, resolve_settings

    from mlx_dgemma.config import FastSamplerConfig

    model, _ = mlx_dgemma.load(model_folder)
    fast = FastSamplerConfig(**{**vars(model.sampler_defaults.fast_sampler), **(levers or {})})
    if weights:
        model.load_weights(list(mx.load(weights).items()), strict=False)
    out = []
    for i, ids in enumerate(prompts):
        row = {}
        for sampler in ("fast", "reference") if reference else ("fast",):
            settings = resolve_settings(model, dict(sampler=sampler, fast_sampler=fast))
            cache, stats, rng = model.make_cache(), DiffusionStats(), RandomSource(seed + i)
            prefill(model, mx.array([ids]), cache)
            shapes, emitted, seen = [], [], 0
            for event in diffuse(model, cache, 1, settings, rng, stats=stats):
                if isinstance(event, Canvas):
                    shapes.append(stats.step_shapes[seen:] if sampler == "fast" else event.steps)
                    seen = len(stats.step_shapes or [])
                    emitted += event.tokens[0].tolist()
            tokens = len(cut_at_eos(emitted, settings.eos_token_ids, settings.max_new_tokens)[0])
            visits = int(stats.position_visits[0])
            if sampler == "fast":
                row.update(canvas_shapes=shapes, canvases=len(shapes), tokens=tokens, visits=visits)
            else:
                row.update(reference_steps=sum(shapes), reference_canvases=len(shapes), reference_tokens=tokens,
                           reference_visits=visits)
        out.append(row)
    return dict(source=source or str(model_folder), canvas_length=model.args.canvas_length, levers=vars(fast),
                generations=out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="per-step shapes of the fast sampler on a trained model")
    r.add_argument("--model", required=True)
    r.add_argument("--weights", help="a training checkpoint's weights (safetensors) over the folder's")
    r.add_argument("--prompts", required=True,
                   help="a JSON list of prompt strings, or a .jsonl file of {\"prompt\": ...} rows (chat template applied)")
    r.add_argument("--limit", type=int, help="at most this many prompts")
    r.add_argument("--fast-levers", type=json.loads, help='FastSamplerConfig fields as JSON, e.g. {"step_cap": 16}')
    r.add_argument("--no-reference", action="store_true", help="record the fast sampler only")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    sub.add_parser("floor", help="the GEMM rate of this process and the bench checkpoint's FLOPs per step")
    a = p.parse_args(argv)
    if a.command == "record":
        import mlx_dgemma

        _, tokenizer = mlx_dgemma.load(a.model)
        text = Path(a.prompts).read_text()
        texts = ([json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
                 if a.prompts.endswith(".jsonl") else json.loads(text))[: a.limit]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        source = f"{a.model}" + (f" + {a.weights}" if a.weights else "") + f", {len(prompts)} prompts of {a.prompts}"
        Path(a.out).write_text(json.dumps(record(a.model, prompts, a.seed, source, a.weights, a.fast_levers,
                                                 not a.no_reference), indent=1))
        print(f"wrote {a.out}")
    else:
        from mlx_dgemma.config import ModelArgs

        args = ModelArgs.from_file(common.ensure_bench_checkpoint() / "config.json")
        print(blas.describe())
        for n in LIVE:
            print(f"{n:4d} positions: {step_flops(args, n, 64, 64) / 1e9:.1f} GFLOP (fast), "
                  f"{step_flops(args, n, 64, args.vocab_size) / 1e9:.1f} GFLOP (full self-conditioning)")


if __name__ == "__main__":
    main()
