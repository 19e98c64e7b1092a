"""Train the canvas-256 model that ships inside the package (`mlx_dgemma/demo_long/`), from scratch, on a CPU.

    python examples/train_long.py                        # data, blank model, training, then installs the result
    python examples/train_long.py --work long_work --no-install

The demo model (`train_demo.py`) has a 20-token canvas; the released model's is 256, and its answers range from a
few tokens (~250 positions of EOS fill) to the whole canvas. This model has the released canvas and such a range
of answers (`long_tasks.py`: 2-digit addition, 9x9 Sudoku, sorts of 3-100 digits, copies of 100-250 letters), so
samplers that skip settled positions or the EOS tail can be judged on it (`benchmarks/fast_quality.py`).

Steps, as in `train_demo.py`: the data (`long_tasks.py`, held-out problems never trained on), a starting model
folder, then `python -m mlx_dgemma.train --fine-tune-type full` with a fixed seed, then the copy into the package.
The starting folder is the demo model's weights (`mlx_dgemma/demo/`, itself trained by `train_demo.py`) under
the demo's architecture with a 256-token canvas and sliding windows that cover a whole example: canvas length and
window are no weights, and a 2-core CPU trains about 8,000 canvas-256 examples an hour, too few to learn the
tasks from random weights, while the demo already knows the characters, digits, addition and the EOS fill.
Everything is seeded: the same command on the same software (and the same demo weights) gives the same model.
The learning rate is constant after the warm-up, so a run of N steps is the first N steps of any longer run: the
bundled model is the step-450 checkpoint of a longer run stopped when its hour was up, which is exactly what
`--iters 450` produces. On the 2-core x86 machine it was trained on, shared with four other jobs (load average
~15), the 450 steps of batch 8 took 49 minutes; the validation loss went 0.46 (step 100), 0.31 (200), 0.30 (300,
400), so more steps at this rate would have helped little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import demo_tasks  # noqa: E402
import long_tasks  # noqa: E402
import train_demo  # noqa: E402

SEED = 0
CANVAS = 256
SLIDING_WINDOW = 512  # a prompt (at most ~260 tokens) and its canvas fit in one window
TRAINING = [  # the exact training command's options (besides paths)
    "--fine-tune-type", "full", "--seed", str(SEED),
    "--iters", "450", "--batch-size", "8", "--learning-rate", "1.5e-3", "--warmup", "30",
    "--lr-schedule", "constant", "--weight-decay", "0.01", "--grad-clip", "1.0",
    "--max-canvases", "1", "--steps-per-report", "20", "--steps-per-eval", "100", "--val-batches", "4",
    "--save-every", "50",
]


def model_config(vocab_size: int) -> dict:
    config = train_demo.model_config(vocab_size)
    config["canvas_length"] = CANVAS
    config["text_config"]["sliding_window"] = SLIDING_WINDOW
    return config


def generation_config() -> dict:
    return {**train_demo.generation_config(), "max_new_tokens": CANVAS}


def write_start_model(folder: Path, weights: Path):
    """The canvas-256 config, generation config, tokenizer and template, and `weights` (the demo's)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = demo_tasks.write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(model_config(vocab), indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(json.dumps(generation_config(), indent=2, sort_keys=True))
    shutil.copy2(weights, folder / "model.safetensors")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="long_work", help="Working folder (data, blank model, checkpoints).")
    p.add_argument("--no-install", action="store_true", help="Do not copy the result into mlx_dgemma/demo_long/.")
    p.add_argument("--start-weights", default=str(ROOT / "mlx_dgemma" / "demo" / "model.safetensors"),
                   help="Weights to start from (default: the bundled demo model's).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run from its last checkpoint.")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("FLAG", "VALUE"),
                   help="Override one training option (quick trials), e.g. --set iters 20.")
    a = p.parse_args(argv)
    work = Path(a.work)
    data, start_model, trained = work / "data", work / "start", work / "model"
    if not (data / "train.jsonl").is_file():
        long_tasks.write_data(data, SEED, long_tasks.TRAIN_MIX, valid_per_task=50, test_per_task=500)
    write_start_model(start_model, Path(a.start_weights))
    options = list(TRAINING)
    for name, value in a.set:
        flag = "--" + name.lstrip("-")
        if flag in options:
            options[options.index(flag) + 1] = value
        else:
            options += [flag, value]
    command = [sys.executable, "-m", "mlx_dgemma.train", "--model", str(start_model), "--data", str(data),
               "--save-path", str(trained), *options, *(["--resume"] if a.resume else [])]
    # Generation lets MLX's CPU buffer cache grow to the memory limit (cpu.keep_buffers: vocabulary-sized steps);
    # training's many batch shapes would fill it (8 GB here) for no gain at this model's size.
    train_demo.run_and_install(command, trained, None if a.no_install else ROOT / "mlx_dgemma" / "demo_long",
                               {"MLX_DGEMMA_CPU_CACHE": os.environ.get("MLX_DGEMMA_CPU_CACHE", "0")})

if __name__ == "__main__":
    main()
