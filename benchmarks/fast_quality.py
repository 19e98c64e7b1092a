"""The fast sampler's quality gate: the reference sampler against the fast one on held-out problems, per task.

    python benchmarks/fast_quality.py                          # both models, 300 held-out problems per task
    python benchmarks/fast_quality.py --models long --json long.json
    python benchmarks/fast_quality.py --from-json demo.json long.json --write     # table into BENCHMARKS.md

Two models trained here on checkable tasks: the bundled demo (`mlx_dgemma/demo/`, a 20-token canvas) and the
canvas-256 model (`mlx_dgemma/demo_long/`, answers of 2 to 250 tokens on the released model's canvas). Columns:

- `reference`: our reference sampler (`sampler="reference"`, token-exact with the reference under shared draws);
- `fast`: `sampler="fast"` with the levers the model's generation_config.json (or `--fast-levers`) sets;
- `transformers`: the reference's own `generate()` (transformers, torch CPU) on the folder `mlx_dgemma.export`
  writes: the reference sampler's column measured by the reference itself.

Per task: exact-match accuracy (the task's checker: Sudoku any valid completion), answer token accuracy
(`answer_token_accuracy`: the share of the expected answer's positions, and of any extra ones generated, that hold
the expected token; a signal where exact match is near 0), tokens per forward (the reference's definition),
decoder passes per problem ("steps"), and position visits per emitted token (decoder positions computed over all
steps, per token up to and including the EOS; autoregressive decoding is 1; for transformers it is passes x
canvas, as the reference computes every position of every pass).

The gate: the fast sampler ships as `fast` only where its accuracy is within 1 point of the reference sampler's on
every task (a fast sampler that is more accurate passes). The exit status is 1 when the gate fails. Every column
sees the same prompts (token ids) and seeds per batch; the random streams of the samplers differ, so accuracy
differences of about a standard error are sampling noise, not a property of the sampler. Because the problems
are shared, the difference is also printed paired (`paired_difference`: fast minus reference per problem, its
standard error from the problems the two columns disagree on), which is the figure that says whether a miss of
the gate is noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import demo_tasks  # noqa: E402
import long_tasks  # noqa: E402

from benchmarks import demo_accuracy  # noqa: E402

SECTION = "## Fast sampler quality gate"
COLUMNS = ("reference", "fast", "transformers")
GATE_POINTS = 1.0


class TaskSet:
    def __init__(self, name: str, folder: Path, tasks, module):
        self.name, self.folder, self.tasks, self.module = name, folder, tasks, module

    def held_out(self, per_task: int, counts: dict[str, int] | None = None) -> list[dict]:
        """`per_task` problems of each task (`counts` overrides it per task: the demo's 2-digit additions have
        849 held-out problems). The first n of a longer list are the n of a shorter one."""
        counts = counts or {}
        return [r for t in self.tasks
                for r in demo_tasks.examples(t, counts.get(t, per_task), 0, {0}, make=self.module.make)]


def task_sets() -> dict[str, TaskSet]:
    from mlx_dgemma import demo

    return {
        "demo": TaskSet("demo", demo.FOLDER, demo_tasks.TASKS, demo_tasks),
        "long": TaskSet("long", ROOT / "mlx_dgemma" / "demo_long", long_tasks.TASKS, long_tasks),
    }


# --- the columns -------------------------------------------------------------------------------------------------


def run_ours(model, prompts, batch_size: int, seed: int, sampler: str, levers: dict | None):
    """Per problem: (generated ids up to the EOS, decoder passes, tokens per forward, position visits)."""
    from mlx_dgemma.config import FastSamplerConfig
    from mlx_dgemma.generate import DiffusionStats, generate_tokens

    kwargs = {"sampler": sampler}
    if sampler == "fast" and levers:
        kwargs["fast_sampler"] = FastSamplerConfig.from_dict(
            {**vars(model.sampler_defaults.fast_sampler), **levers}, "--fast-levers")
    rows = []
    for b in range(0, len(prompts), batch_size):
        stats = DiffusionStats()
        out = generate_tokens(model, prompts[b : b + batch_size], seed=seed + b, stats=stats, **kwargs)
        rows += [(ids, int(p), float(t), int(v))
                 for ids, p, t, v in zip(out, stats.passes, stats.tokens_per_forward, stats.position_visits)]
    return rows


def run_transformers(ref, prompts, batch_size: int, seed: int, pad_id: int, canvas: int):
    outputs, tpf = demo_accuracy.run_reference(ref, prompts, batch_size, seed, pad_id)
    rows = []
    for ids, t in zip(outputs, tpf):
        valid = sum(1 for x in ids if x != pad_id)  # the reference's numerator of tokens per forward
        passes = round(valid / t) if t > 0 else 0
        rows.append((ids, passes, t, passes * canvas))
    return rows


def answer_token_accuracy(generated: list[int], expected: list[int]) -> float:
    """Position-wise token accuracy of an answer: the number of positions i with generated[i] == expected[i],
    over max(len(generated), len(expected)) (both without the EOS; an answer too short misses the positions it
    lacks, one too long is charged for each extra token; an empty expected answer that is met scores 1)."""
    width = max(len(generated), len(expected))
    if width == 0:
        return 1.0
    return sum(g == e for g, e in zip(generated, expected)) / width


def paired_difference(reference: list[float], other: list[float]) -> dict:
    """`other` minus `reference` over the same problems: the mean per-problem difference and its standard error
    (sample standard deviation of the differences / sqrt(n)). For 0/1 outcomes the differences are nonzero only
    on discordant problems: with `better` problems only `other` solves and `worse` only `reference` does, the
    mean is (better - worse) / n and the squared error (better + worse - (better - worse)^2 / n) / (n (n - 1))."""
    if len(reference) != len(other):
        raise ValueError(f"paired columns differ in length: {len(reference)} and {len(other)}")
    n = len(reference)
    d = [o - r for r, o in zip(reference, other)]
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"n": n, "diff": mean, "stderr": math.sqrt(var / n) if n else 0.0,
            "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}


def score(problems, rows, task_set: TaskSet, tokenizer, stop: set[int]) -> dict:
    """Per task: accuracy, its standard error, answer token accuracy, tokens/forward, passes, visits per emitted
    token; and the per-problem outcomes (`correct`, `token_accuracy_each`, in problem order) for paired
    comparisons."""
    per = {}
    for problem, (ids, passes, tpf, visits) in zip(problems, rows):
        answer = demo_accuracy.strip(ids, stop)
        emitted = min(len(answer) + 1, len(ids))  # the answer and its EOS
        ok = task_set.module.check(problem["prompt"], tokenizer.decode(answer))
        tok_acc = answer_token_accuracy(answer, tokenizer.encode(problem["completion"], add_special_tokens=False))
        per.setdefault(demo_tasks.task_of(problem["prompt"]), []).append(
            (ok, tpf, passes, visits / max(emitted, 1), tok_acc))
    out = {}
    for task, values in per.items():
        n = len(values)
        acc = sum(v[0] for v in values) / n
        out[task] = {
            "n": n, "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n),
            "token_accuracy": sum(v[4] for v in values) / n,
            "tokens_per_forward": sum(v[1] for v in values) / n, "steps": sum(v[2] for v in values) / n,
            "visits_per_token": sum(v[3] for v in values) / n,
            "correct": [int(v[0]) for v in values], "token_accuracy_each": [round(v[4], 6) for v in values],
        }
    return out


def paired(result: dict, task: str, key: str = "correct") -> dict | None:
    """fast minus reference on `task`, paired by problem (None when a column lacks per-problem outcomes)."""
    cols = result["columns"]
    if "fast" not in cols or "reference" not in cols:
        return None
    ref, fast = cols["reference"].get(task, {}), cols["fast"].get(task, {})
    if key not in ref or key not in fast:
        return None
    return paired_difference(ref[key], fast[key])


def measure(task_set: TaskSet, per_task: int, batch_size: int, seed: int, columns, levers, on_column=None,
            counts: dict[str, int] | None = None) -> dict:
    """One model's columns; `on_column(result so far)` after each (long runs keep what they measured)."""
    import mlx_dgemma

    model, tokenizer = mlx_dgemma.load(task_set.folder)
    problems = task_set.held_out(per_task, counts)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in problems]
    settings = model.sampler_defaults
    stop = set(settings.eos_token_ids) | {settings.pad_token_id}
    result = {"model": task_set.name, "folder": _shown(task_set.folder), "per_task": per_task,
              "counts": {t: counts[t] for t in (counts or {}) if t in task_set.tasks},
              "batch_size": batch_size, "seed": seed, "canvas": model.args.canvas_length,
              "sampler": {k: v for k, v in settings.to_dict().items() if k != "fast_sampler"},
              "fast_levers": {**vars(settings.fast_sampler), **(levers or {})}, "columns": {}, "seconds": {}}
    for column in columns:
        start = time.perf_counter()
        if column == "transformers":
            rows = _transformers_rows(task_set.folder, prompts, batch_size, seed, settings.pad_token_id,
                                      model.args.canvas_length)
        else:
            rows = run_ours(model, prompts, batch_size, seed, column, levers)
        result["seconds"][column] = time.perf_counter() - start
        result.setdefault("commits", {})[column] = _commit()
        result["columns"][column] = score(problems, rows, task_set, tokenizer, stop)
        print(f"[{task_set.name}] {column}: {result['seconds'][column]:.0f} s", file=sys.stderr, flush=True)
        if on_column is not None:
            on_column(result)
    return result


def _shown(folder: Path) -> str:
    try:
        return str(folder.relative_to(ROOT))
    except ValueError:  # --model-folder outside the repository
        return str(folder)


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def merge(results: list[dict]) -> list[dict]:
    """One result per model: columns measured in later runs (e.g. the fast sampler after a change) replace
    earlier ones; each column keeps the commit it was measured at."""
    out: dict[str, dict] = {}
    for r in results:
        if r["model"] not in out:
            out[r["model"]] = json.loads(json.dumps(r))
            continue
        m = out[r["model"]]
        if r.get("seed") != m.get("seed"):  # other draws: the paired difference would pair unrelated runs
            raise ValueError(f"{r['model']}: runs with seed {m.get('seed')} and seed {r.get('seed')}")
        if (r["per_task"], r.get("counts", {})) != (m["per_task"], m.get("counts", {})):
            raise ValueError(f"{r['model']}: runs with {m['per_task']} {m.get('counts', {})} and "
                             f"{r['per_task']} {r.get('counts', {})} problems per task")
        for key in ("columns", "seconds", "commits"):
            m.setdefault(key, {}).update(r.get(key, {}))
        if "fast" in r["columns"]:
            m["fast_levers"] = r["fast_levers"]
    return list(out.values())


def _transformers_rows(folder, prompts, batch_size, seed, pad_id, canvas):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from mlx_dgemma.export import export_hf

    torch.set_flush_denormal(True)  # denormals made the reference's CPU steps ~20x slower (design/training.md)
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(folder, Path(tmp) / "hf", verbose=False)
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(hf).eval()
    return run_transformers(ref, prompts, batch_size, seed, pad_id, canvas)


# --- the gate and the table --------------------------------------------------------------------------------------


def gate(result: dict) -> dict[str, bool] | None:
    """Per task: is the fast sampler's accuracy within GATE_POINTS of the reference sampler's?"""
    cols = result["columns"]
    if "fast" not in cols or "reference" not in cols:
        return None
    # rounded: 95.0% against 96.0% is exactly 1 point, not 1.0000000000000009
    return {t: round(100 * (cols["fast"][t]["accuracy"] - cols["reference"][t]["accuracy"]), 6) >= -GATE_POINTS
            for t in cols["reference"]}


def table(result: dict) -> str:
    """Per task: n, exact match per column and fast - reference paired (points, ± its standard error; in
    brackets the problems only fast / only reference solved), answer token accuracy likewise, then the work."""
    cols = [c for c in COLUMNS if c in result["columns"]]
    pair = "fast" in cols and "reference" in cols
    head = ["task", "n"] + [f"accuracy, {c}" for c in cols] + (["fast - ref, paired"] if pair else [])
    head += [f"token acc, {c}" for c in cols] + (["token acc fast - ref, paired"] if pair else [])
    head += [f"tok/fwd, {c}" for c in cols] + [f"steps, {c}" for c in cols] + [f"visits/token, {c}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    tasks = list(result["columns"][cols[0]])
    for task in tasks:
        c = {k: result["columns"][k][task] for k in cols}
        cells = [task, str(c[cols[0]]["n"])] + [f"{100 * c[k]['accuracy']:.1f}% ±{100 * c[k]['stderr']:.1f}" for k in cols]
        if pair:
            d = paired(result, task)
            cells.append("—" if d is None else
                         f"{100 * d['diff']:+.1f} ±{100 * d['stderr']:.1f} ({d['better']}/{d['worse']})")
        cells += [f"{100 * c[k]['token_accuracy']:.1f}%" if "token_accuracy" in c[k] else "—" for k in cols]
        if pair:
            d = paired(result, task, "token_accuracy_each")
            cells.append("—" if d is None else f"{100 * d['diff']:+.1f} ±{100 * d['stderr']:.1f}")
        cells += [f"{c[k]['tokens_per_forward']:.2f}" for k in cols] + [f"{c[k]['steps']:.1f}" for k in cols]
        cells += [f"{c[k]['visits_per_token']:.1f}" for k in cols]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = gate(result)
    if verdict is not None:
        failed = [t for t, ok in verdict.items() if not ok]
        lines.append("")
        lines.append(f"Gate ({result['model']}): " + ("PASS, the fast sampler is within "
                     f"{GATE_POINTS:g} point on every task" if not failed else f"FAIL on {', '.join(failed)}"))
        empty = [t for t in verdict if result["columns"]["reference"][t]["accuracy"] == 0
                 and result["columns"]["fast"][t]["accuracy"] == 0]
        if empty:  # nothing solved by either column: the rule passes without saying anything
            lines.append(f"  empty on {', '.join(empty)}: neither sampler solves a problem exactly (see token acc)")
        for t in failed:
            d = paired(result, t)
            if d is not None and d["stderr"] > 0:
                z = d["diff"] / d["stderr"]
                lines.append(f"  {t}: paired difference {100 * d['diff']:+.1f} points = {z:+.1f} standard errors"
                             + (" (inside 2 standard errors of 0: not resolved)" if abs(z) < 2 else ""))
    return "\n".join(lines)


def _problems(r: dict) -> str:
    other = ", ".join(f"{t} {n}" for t, n in r.get("counts", {}).items())
    return f"{r['per_task']} problems per task" + (f" ({other})" if other else "")


def section(results: list[dict], machine: str, commit: str, command: str) -> str:
    parts = [f"""{SECTION}

`benchmarks/fast_quality.py` ({machine}; written at commit {commit}, each column's own commit below;
{time.strftime('%Y-%m-%d')}): held-out problems never
trained on, the same prompts and per-batch seeds for every column. Accuracy is exact match (± one standard error);
"fast - ref, paired" is the per-problem difference of the two samplers on the same problems, in points, ± its
standard error, with (problems only fast solved / only reference solved); token acc is the answer token accuracy
(matching positions / max(generated, expected) answer length, per problem, averaged); tokens per forward the
reference's definition, steps the decoder passes per problem, visits/token the decoder
positions computed per emitted token (answer + EOS; autoregressive decoding is 1). `transformers` is the
reference's own `generate()` on the exported folder. The gate: `fast` ships only where its accuracy is within
{GATE_POINTS:g} point of `reference` on every task.

Command: `{command}`
"""]
    for r in results:
        s = r["sampler"]
        parts.append(f"""
### {r['model']} model (`{r['folder']}/`, canvas {r['canvas']}, {_problems(r)})

Sampler settings (the model's generation_config.json): {s['max_denoising_steps']} steps, entropy bound
{s['entropy_bound']}, temperature {s['t_max']} -> {s['t_min']}, batches of {r['batch_size']}, seed {r['seed']} + batch
offset. Fast levers: `{json.dumps(r['fast_levers'], sort_keys=True)}`.
Wall time (2-core CPU shared with other jobs): {', '.join(f'{c} {s_:.0f} s' for c, s_ in r['seconds'].items())};
commits: {', '.join(f'{c} {k}' for c, k in r.get('commits', {}).items())}
({r.get('gemm', 'GEMM rate not recorded')}).

{table(r)}
""")
    return "".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["demo", "long"], default=["demo", "long"])
    p.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS))
    p.add_argument("--per-task", type=int, default=300)
    p.add_argument("--task-count", action="append", default=[], metavar="TASK=N",
                   help="Another number of problems for one task (repeatable), e.g. add=800.")
    p.add_argument("--batch-size", type=int, help="Default: 100 (demo), 50 (canvas 256).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-levers", type=json.loads, default=None,
                   help='JSON object of FastSamplerConfig fields over the model\'s, e.g. \'{"step_cap": 16}\'.')
    p.add_argument("--model-folder", action="append", default=[], nargs=2, metavar=("MODEL", "FOLDER"),
                   help="Use another folder for a model (e.g. long long_work/model).")
    p.add_argument("--json", help="Write the raw numbers here (one list of per-model results).")
    p.add_argument("--from-json", nargs="+", help="Tables from earlier --json runs instead of measuring.")
    p.add_argument("--write", action="store_true", help="Update the section in BENCHMARKS.md.")
    a = p.parse_args(argv)
    from benchmarks.common import machine_info, print_gemm_rate

    sets = task_sets()
    counts = {}
    for item in a.task_count:
        task, _, n = item.partition("=")
        if not n.isdigit() or int(n) <= 0 or not any(task in t.tasks for t in sets.values()):
            p.error(f"--task-count {item}: expected TASK=N with a task of the models and N > 0")
        counts[task] = int(n)
    for name, folder in a.model_folder:
        if name not in sets:
            p.error(f"--model-folder {name}: choose demo or long")
        sets[name].folder = Path(folder).resolve()
    if a.from_json:
        results = merge([r for f in a.from_json for r in json.loads(Path(f).read_text())])
    else:
        results, gemm = [], print_gemm_rate()  # accuracy does not depend on it; the wall times below do
        for name in a.models:
            if not (sets[name].folder / "config.json").is_file():
                p.error(f"{sets[name].folder}: no model (train it with examples/train_long.py)")
            size = a.batch_size or (100 if name == "demo" else 50)
            def save(partial, done=list(results)):
                if a.json:
                    Path(a.json).write_text(json.dumps(done + [{**partial, "gemm": gemm}], indent=2))

            results.append({**measure(sets[name], a.per_task, size, a.seed, a.columns, a.fast_levers, save, counts),
                            "gemm": gemm})
    ok = True
    for r in results:
        print(f"\n{r['model']} model ({_problems(r)}, held out)\n")
        print(table(r))
        verdict = gate(r)
        ok = ok and (verdict is None or all(verdict.values()))
    if a.write:
        import subprocess

        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        info = machine_info()
        machine = f"{info.get('cpu', info['machine'])}, {info['cpus']} cores, MLX CPU backend"
        command = "python benchmarks/fast_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        demo_accuracy.write_section(ROOT / "BENCHMARKS.md", section(results, machine, commit, command), SECTION)
        print(f"updated {ROOT / 'BENCHMARKS.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
