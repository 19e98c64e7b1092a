"""The demo model's accuracy with our generation and with the reference's, on the same held-out problems.

    python benchmarks/demo_accuracy.py                      # 500 held-out problems per task, prints the table
    python benchmarks/demo_accuracy.py --write              # ...and updates BENCHMARKS.md's section

The bundled demo model is exported to Hugging Face format (`mlx_dgemma.export`), loaded with transformers'
`from_pretrained`, and both sides answer the same prompts (rendered once, by our tokenizer and the model's chat
template) with the same sampler settings: the model's `generation_config.json`, which neither side overrides
(48 denoising steps, entropy bound 0.1, temperature 0.8 -> 0.4, stability 1, confidence 0.005). The random
streams differ (torch's and MLX's), so the two accuracies are two samples of the same quantity. The held-out
problems come from `examples/demo_tasks.py` (bucket 0 of the hash split, never trained on).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import demo_tasks  # noqa: E402

SECTION = "## Demo model accuracy (ours vs the reference)"


def held_out(per_task: int, seed: int = 0) -> list[dict]:
    """The test split of `examples/demo_tasks.py` (the same rows as its test.jsonl for this seed)."""
    return [r for task in demo_tasks.TASKS for r in demo_tasks.examples(task, per_task, seed, {0})]


def strip(ids, stop: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(t)
    return out


def run_ours(model, prompts, batch_size, seed):
    import numpy as np

    from mlx_dgemma.diffusion import DiffusionStats, generate_tokens

    outputs, tpf = [], []
    for b in range(0, len(prompts), batch_size):
        stats = DiffusionStats()
        outputs += generate_tokens(model, prompts[b : b + batch_size], seed=seed + b, stats=stats)
        tpf += np.asarray(stats.tokens_per_forward, dtype=float).tolist()
    return outputs, tpf


def run_reference(ref, prompts, batch_size, seed, pad_id):
    import torch

    outputs, tpf = [], []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        torch.manual_seed(seed + b)
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=mask)
        outputs += out.sequences[:, length:].tolist()
        tpf += out.tokens_per_forward.float().tolist()
    return outputs, tpf


def score(rows, outputs, tokenizer, stop):
    per_task = {}
    for row, ids in zip(rows, outputs):
        text = tokenizer.decode(strip(ids, stop))
        per_task.setdefault(demo_tasks.task_of(row["prompt"]), []).append(demo_tasks.check(row["prompt"], text))
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def mean_by_task(rows, values):
    per_task = {}
    for row, v in zip(rows, values):
        per_task.setdefault(demo_tasks.task_of(row["prompt"]), []).append(v)
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def measure(model_path: Path, per_task: int, batch_size: int, seed: int) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    import mlx_dgemma
    from mlx_dgemma.export import export_hf

    torch.set_flush_denormal(True)
    model, tokenizer = mlx_dgemma.load(model_path)
    rows = held_out(per_task)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in rows]
    settings = model.sampler_defaults
    stop = set(settings.eos_token_ids) | {settings.pad_token_id}
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(model_path, Path(tmp) / "hf", verbose=False)
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(hf).eval()
    start = time.perf_counter()
    ours, ours_tpf = run_ours(model, prompts, batch_size, seed)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs, ref_tpf = run_reference(ref, prompts, batch_size, seed, settings.pad_token_id)
    ref_s = time.perf_counter() - start
    return {
        "per_task": per_task, "seed": seed, "batch_size": batch_size, "sampler": settings.to_dict(),
        "ours": score(rows, ours, tokenizer, stop), "reference": score(rows, theirs, tokenizer, stop),
        "ours_tpf": mean_by_task(rows, ours_tpf), "reference_tpf": mean_by_task(rows, ref_tpf),
        "ours_seconds": ours_s, "reference_seconds": ref_s,
    }


def table(result: dict) -> str:
    n = result["per_task"]
    lines = [
        f"| task ({n} held-out problems each) | ours | reference | difference | tokens/forward, ours | tokens/forward, reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task in demo_tasks.TASKS:
        a, b = 100 * result["ours"][task], 100 * result["reference"][task]
        lines.append(f"| {task} | {a:.1f}% | {b:.1f}% | {a - b:+.1f} | {result['ours_tpf'][task]:.2f} | "
                     f"{result['reference_tpf'][task]:.2f} |")
    a = 100 * sum(result["ours"].values()) / len(result["ours"])
    b = 100 * sum(result["reference"].values()) / len(result["reference"])
    ta = sum(result["ours_tpf"].values()) / len(result["ours_tpf"])
    tb = sum(result["reference_tpf"].values()) / len(result["reference_tpf"])
    lines.append(f"| all | {a:.1f}% | {b:.1f}% | {a - b:+.1f} | {ta:.2f} | {tb:.2f} |")
    return "\n".join(lines)


def section(result: dict, size_mb: float, params: int, repeats: list[dict] = ()) -> str:
    s = result["sampler"]
    text = f"""{SECTION}

The bundled demo model (`mlx_dgemma/demo/`: {params / 1e6:.2f}M parameters, {size_mb:.1f} MB, trained from scratch by
`python examples/train_demo.py`) answers held-out problems (never trained on; `examples/demo_tasks.py`) with our
generation (`mlx_dgemma.generate_tokens`, MLX) and with the reference's `generate()` (transformers 5.24.0, torch
CPU) on the folder `python -m mlx_dgemma.convert --to-hf` exports. Same prompts (token ids), same sampler settings,
neither side overriding the model's `generation_config.json`:

- {s['max_denoising_steps']} denoising steps, entropy bound {s['entropy_bound']}, temperature {s['t_max']} -> {s['t_min']}, stability {s['stability_threshold']}, confidence {s['confidence_threshold']},
  at most {s['max_new_tokens']} new tokens;
- batches of {result['batch_size']} (left-padded), seed {result['seed']} (MLX) and `torch.manual_seed({result['seed']})` per batch.

An answer counts when it is exactly right (Sudoku: the unique solution). Tokens per forward are the reference's
definition (generated tokens, pads after EOS excluded, per decoder pass of that row), averaged over the problems.
The random streams differ (MLX's and torch's), so each column is one sample of the same quantity.

{table(result)}
"""
    for r in repeats:
        diffs = ", ".join(
            f"{t} {100 * r['ours'][t]:.1f}/{100 * r['reference'][t]:.1f}" for t in demo_tasks.TASKS
        )
        worst = max(abs(r["ours"][t] - r["reference"][t]) for t in demo_tasks.TASKS)
        text += (f"\nRepeated with seed {r['seed']} (ours/reference, %): {diffs};\n"
                 f"largest difference {100 * worst:.1f} points.\n")
    again = " ".join(f"--repeat seed{r['seed']}.json" for r in repeats)
    first = " ".join(f"`python benchmarks/demo_accuracy.py --seed {r['seed']} --json seed{r['seed']}.json`,"
                     for r in repeats)
    text += f"""
Commands: {first} `python benchmarks/demo_accuracy.py --write {again}`
(CPU, a 2-core machine shared with other jobs: ours {result['ours_seconds']:.0f} s, the reference
{result['reference_seconds']:.0f} s for all {4 * result['per_task']} problems).
"""
    return text


def write_section(path: Path, text: str, heading: str = SECTION):
    """Replace the section under `heading` in `path` with `text` (appended when there is none)."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    if heading in old:
        start = old.index(heading)
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + ("\n" + old[nxt:] if nxt >= 0 else "\n")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="An MLX model folder trained on the demo tasks. Default: the bundled demo model.")
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="Also write the raw numbers here.")
    p.add_argument("--write", action="store_true", help="Update the section in BENCHMARKS.md.")
    p.add_argument("--from-json", help="Use the numbers of an earlier --json run instead of measuring.")
    p.add_argument("--repeat", nargs="*", help="--json files of runs with other seeds, summarised under the table.")
    a = p.parse_args(argv)
    from mlx.utils import tree_flatten

    from mlx_dgemma import demo, load

    path = Path(a.model) if a.model else demo.FOLDER
    repeats = [json.loads(Path(f).read_text()) for f in a.repeat or []]
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
    else:
        result = measure(path, a.per_task, a.batch_size, a.seed)
    print(table(result))
    worst = max(abs(result["ours"][t] - result["reference"][t]) for t in demo_tasks.TASKS)
    print(f"largest difference: {100 * worst:.1f} points")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    if a.write:
        model, _ = load(path)
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
        write_section(ROOT / "BENCHMARKS.md", section(result, size, params, repeats))
        print(f"updated {ROOT / 'BENCHMARKS.md'}")
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
