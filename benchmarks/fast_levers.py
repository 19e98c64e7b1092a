"""The fast sampler's levers one at a time, on a trained model: accuracy and work per task.

    python benchmarks/fast_levers.py                       # the bundled demo model, 300 held-out problems per task
    python benchmarks/fast_levers.py --levers default,freeze --per-task 100 --json out.json

Every row answers the same held-out problems (`examples/demo_tasks.py`, never trained on) with the same seed:
the reference sampler first, then the fast sampler under one `FastSamplerConfig` per row (`LEVERS`). Printed per
task: exact-match accuracy (and its difference to the reference sampler, in points, paired by problem, ± its
standard error), tokens per forward,
denoising steps per canvas and decoder position visits per emitted token (the reference sampler computes every
canvas position at every step; autoregressive decoding is 1). The quality gate of issue 9 is
`benchmarks/fast_quality.py`; this script is how each lever's share was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import demo_tasks  # noqa: E402

from benchmarks.demo_accuracy import strip  # noqa: E402
from benchmarks.fast_quality import paired_difference  # noqa: E402

OFF = dict(top_k=None, gathered_sc=False, freeze=False, confirm=False, compact=False, eos_cut=False)

#: name -> FastSamplerConfig fields (None: the reference sampler): the monotone-commit family built up one lever at
#: a time, the shipped default (those plus top-64 statistics and gathered self-conditioning) and variants, then
#: levers alone on top of the reference's rules.
LEVERS = {
    "reference": None,
    "freeze": dict(OFF, freeze=True),
    "freeze+confirm": dict(OFF, freeze=True, confirm=True),
    "freeze+confirm+compact": dict(OFF, freeze=True, confirm=True, compact=True),
    "freeze+confirm+compact+eos_cut": dict(OFF, freeze=True, confirm=True, compact=True, eos_cut=True),
    "default": {},
    "default-eos_cut_pending": dict(eos_cut_pending=False),
    "default+top_k=8": dict(top_k=8),
    "default+step_cap=8": dict(step_cap=8),
    "default+step_cap=8+repair": dict(step_cap=8, repair=True),
    "default+repair_all": dict(repair_all=True),
    "default+confirm_steps=3": dict(confirm_steps=3),
    "default+commit_entropy=0.01": dict(commit_entropy=0.01),
    "default+commit_entropy=0.001": dict(commit_entropy=0.001),
    "default+commit_entropy=0.01+repair_all": dict(commit_entropy=0.01, repair_all=True),
    "default+commit_entropy=0.01-eos_cut": dict(commit_entropy=0.01, eos_cut=False),
    "default+commit_entropy=0.01-eos_cut_pending": dict(commit_entropy=0.01, eos_cut_pending=False),
    "default-eos_cut": dict(eos_cut=False),
    "commit_entropy=0.01-eos_cut_pending+repair_all": dict(commit_entropy=0.01, eos_cut_pending=False, repair_all=True),
    "commit_entropy=0.001-eos_cut_pending": dict(commit_entropy=0.001, eos_cut_pending=False),
    "top_k=8": dict(OFF, top_k=8),
    "top_k=8+gathered_sc": dict(OFF, top_k=8, gathered_sc=True),
    "argmax_commit": dict(OFF, argmax_commit=True),
    "top_k+gathered_sc": dict(OFF, top_k=64, gathered_sc=True),
    "default+resample_pending": dict(resample_pending=True),
    "default+commit_entropy=0.05": dict(commit_entropy=0.05),
    "default+commit_entropy=None": dict(commit_entropy=None),
    "freeze+confirm+commit_entropy": dict(OFF, freeze=True, confirm=True, commit_entropy=0.01),
    "top_k+gathered_sc+freeze+confirm+commit_entropy": dict(OFF, top_k=64, gathered_sc=True, freeze=True, confirm=True, commit_entropy=0.01),
}


def run(model, prompts, levers, batch_size, seed):
    from mlx_dgemma.config import FastSamplerConfig
    from mlx_dgemma.diffusion import DiffusionStats, generate_tokens

    outputs, rows = [], []
    for b in range(0, len(prompts), batch_size):
        stats = DiffusionStats()
        kw = {} if levers is None else dict(sampler="fast", fast_sampler=FastSamplerConfig(**levers))
        out = generate_tokens(model, prompts[b : b + batch_size], seed=seed + b, stats=stats, **kw)
        outputs += out
        for i, o in enumerate(out):
            rows.append(dict(tpf=float(stats.tokens_per_forward[i]), visits=int(stats.position_visits[i]),
                             passes=int(stats.passes[i]), tokens=len(o)))
    return outputs, rows


def summarize(problems, outputs, rows, tokenizer, stop):
    per = {}
    for p, ids, r in zip(problems, outputs, rows):
        t = demo_tasks.task_of(p["prompt"])
        d = per.setdefault(t, dict(n=0, tpf=0.0, visits=0, tokens=0, passes=0, correct=[]))
        d["correct"].append(int(demo_tasks.check(p["prompt"], tokenizer.decode(strip(ids, stop)))))
        d["n"] += 1
        d["tpf"] += r["tpf"]
        d["visits"] += r["visits"]
        d["tokens"] += r["tokens"]
        d["passes"] += r["passes"]
    return {t: dict(accuracy=sum(d["correct"]) / d["n"], tpf=d["tpf"] / d["n"], passes=d["passes"] / d["n"],
                    visits_per_token=d["visits"] / max(d["tokens"], 1), correct=d["correct"]) for t, d in per.items()}


def table(results: dict) -> str:
    ref = results.get("reference")
    lines = ["| levers | " + " | ".join(f"{t}: acc (diff) / tok/fwd / passes / visits/tok" for t in demo_tasks.TASKS)
             + " |", "|---|" + "---:|" * len(demo_tasks.TASKS)]
    for name, r in results.items():
        cells = []
        for t in demo_tasks.TASKS:
            if t not in r["tasks"]:
                cells.append("")
                continue
            x = r["tasks"][t]
            diff = ""
            if ref and name != "reference" and t in ref["tasks"]:
                diff = f" ({100 * (x['accuracy'] - ref['tasks'][t]['accuracy']):+.1f})"
                if "correct" in x and "correct" in ref["tasks"][t]:  # paired by problem, ± its standard error
                    d = paired_difference(ref["tasks"][t]["correct"], x["correct"])
                    diff = f" ({100 * d['diff']:+.1f} ±{100 * d['stderr']:.1f})"
            cells.append(f"{100 * x['accuracy']:.1f}%{diff} / {x['tpf']:.2f} / {x['passes']:.1f} / "
                         f"{x['visits_per_token']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="An MLX model folder trained on the demo tasks. Default: the bundled demo model.")
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated names of {list(LEVERS)}")
    p.add_argument("--per-task", type=int, default=300)
    p.add_argument("--tasks", default=",".join(demo_tasks.TASKS), help="comma-separated, of " + ",".join(demo_tasks.TASKS))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="Also write the raw numbers here (after every row).")
    p.add_argument("--from-json", help="Print the table of an earlier --json run.")
    a = p.parse_args(argv)
    if a.from_json:
        print(table(json.loads(Path(a.from_json).read_text())["results"]))
        return 0
    import mlx_dgemma
    from mlx_dgemma import demo

    names = [n for n in a.levers.split(",") if n]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {unknown} (known: {list(LEVERS)})")
    model, tokenizer = mlx_dgemma.load(a.model or demo.FOLDER)
    tasks = [t for t in a.tasks.split(",") if t]
    # only the tasks asked for (the demo's 2-digit additions have 849 held-out problems, the others thousands);
    # the same rows as held_out()'s for these tasks
    problems = [r for t in demo_tasks.TASKS if t in tasks for r in demo_tasks.examples(t, a.per_task, a.seed, {0})]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in problems]
    settings = model.sampler_defaults
    stop = set(settings.eos_token_ids) | {settings.pad_token_id}
    results = {}
    for name in names:
        start = time.perf_counter()
        outputs, rows = run(model, prompts, LEVERS[name], a.batch_size, a.seed)
        results[name] = dict(levers=LEVERS[name], seconds=time.perf_counter() - start,
                             tasks=summarize(problems, outputs, rows, tokenizer, stop))
        print(f"[{name}] {results[name]['seconds']:.0f} s", file=sys.stderr)
        if a.json:  # after every row: a long run can be read (or stopped) part way
            Path(a.json).write_text(json.dumps(dict(per_task=a.per_task, seed=a.seed, results=results), indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
