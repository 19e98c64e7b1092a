"""The training loop (`train`), its model setup and saving (`build_model`, `save_model`) and resumable
checkpoints. The data is `train_data.py`, the loss `train_objective.py`, the command line `train.py`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs, read_json
from .train_data import Example, batch_indices, canvases_needed, draw_noise, make_batch
from .train_objective import loss_terms, training_activations

CHECKPOINTS = "checkpoints"
FROZEN_BUFFERS = ("layer_scalar", "encoder_layer_scalar")  # buffers in the reference, never trained


# --- model setup, saving ---------------------------------------------------------------------------------------


def init_weights(model, seed: int, std: float = 0.02):
    """Initialisation for a model trained from scratch: the reference's N(0, std) for every matrix (linears,
    embedding, experts) and ones for norms and scales, except the query and key norms, which start at
    head_dim ** -0.25: Gemma 4 attention has no 1/sqrt(head_dim) factor, and unit-RMS queries and keys give
    attention logits of spread sqrt(head_dim) at the start, a saturated softmax that slows early learning (on
    the demo's reversal task: validation loss 0.92 instead of 1.08 after 500 steps). Training moves them freely."""
    key = mx.random.key(seed)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, value), k in zip(params, keys):
        if value.ndim >= 2:
            new.append((name, (std * mx.random.normal(value.shape, key=k)).astype(value.dtype)))
        elif name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            new.append((name, mx.full(value.shape, value.shape[0] ** -0.25, dtype=value.dtype)))
        else:
            new.append((name, mx.ones(value.shape, dtype=value.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def build_model(folder: Path, from_scratch: bool, seed: int):
    from .loading import load_model
    from .model import Model
    from .config import SamplerConfig

    if not from_scratch:
        return load_model(folder)
    args = ModelArgs.from_file(folder / "config.json")
    model = Model(args)
    init_weights(model, seed)
    model.sampler_defaults = SamplerConfig.from_folder(folder, args)
    return model


def save_model(model, source: Path, out: Path, dtype: mx.Dtype | None = None):
    """A loadable model folder: the weights (ours), plus the source's config, generation config, tokenizer and
    any vision weights the source carries (the text model does not hold them)."""
    from .conversion import COPIED_FILES
    from .model import VISION_PREFIXES, checkpoint_name
    from .weights import DTYPE_NAMES, checkpoint_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if any(k.endswith((".lora_a", ".lora_b")) for k in weights):
        raise ValueError("fuse the LoRA adapters (lora.fuse_model) before saving the model")
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        files = checkpoint_files(source)
    except Exception:
        files = []
    for path in files:
        if path.suffix == ".safetensors":
            for name, value in mx.load(str(path)).items():
                ours = checkpoint_name(name)
                if ours is not None and ours.startswith(VISION_PREFIXES):
                    weights[ours] = value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = read_json(source / "config.json")
    floats = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    names = {v: k for k, v in DTYPE_NAMES.items()}
    if len(floats) == 1 and next(iter(floats)) in names:
        config["dtype"] = names[next(iter(floats))]
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    for name in COPIED_FILES:
        if (source / name).is_file() and Path(source / name).resolve() != (out / name).resolve():
            shutil.copy2(source / name, out / name)


# --- checkpoints -----------------------------------------------------------------------------------------------


def _checkpoint_dir(save_path: Path, step: int) -> Path:
    return save_path / CHECKPOINTS / f"step_{step:07d}"


def save_checkpoint(save_path: Path, step: int, model, optimizer, meta: dict):
    folder = _checkpoint_dir(save_path, step)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def latest_checkpoint(save_path: Path) -> Path | None:
    found = sorted((save_path / CHECKPOINTS).glob("step_???????")) if (save_path / CHECKPOINTS).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(folder: Path, model, optimizer, meta: dict) -> int:
    state = json.loads((folder / "state.json").read_text())
    for key in ("seed", "fine_tune_type", "batch_size"):
        if key in meta and state.get(key) != meta[key]:
            raise ValueError(f"{folder}: was written with {key}={state.get(key)!r}, this run has {meta[key]!r}")
    trainable = mx.load(str(folder / "trainable.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(trainable) != set(expected):
        raise ValueError(f"{folder}: its trainable weights do not match this model and fine-tuning type")
    model.update(tree_unflatten(list(trainable.items())))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return int(state["step"])


# --- the loop --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"  # or "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    t_min: float = 0.001
    sc_prob: float = 0.5
    ar_weight: float = 1.0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 8
    save_every: int = 0  # 0: only at the end


def make_schedule(cfg: TrainConfig):
    lr = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        main = lr
    elif cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(cfg.iters - cfg.warmup, 1), end=lr * 0.1)
    else:
        raise ValueError(f"--lr-schedule {cfg.lr_schedule!r}: choose constant or cosine")
    if cfg.warmup > 0:
        main = main if callable(main) else (lambda _: lr)
        return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, cfg.warmup), main], [cfg.warmup])
    return main


class Progress:
    """One line, redrawn in place on a terminal; a line every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, stream=None):
        self.total, self.every, self.stream = total, max(1, every), stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_step, self.started = start, time.perf_counter()
        self.tokens, self.window_start, self.window_tokens = 0, time.perf_counter(), 0

    def update(self, step: int, loss: float, tokens: int, lr: float, extra: str = ""):
        self.tokens += tokens
        self.window_tokens += tokens
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        done = step - self.start_step
        eta = (now - self.started) / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"{step}/{self.total} [{bar}] loss {loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e} | "
                f"eta {int(eta) // 60}:{int(eta) % 60:02d}{extra}")
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        if step % self.every == 0:
            self.window_start, self.window_tokens = now, 0

    def note(self, text: str):
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def evaluate(model, examples: list[Example], cfg: TrainConfig, pad_id: int, eos_id: int) -> float:
    """Mean loss over fixed validation batches with fixed noise (comparable across steps and runs)."""
    with training_activations(model):
        return _evaluate(model, examples, cfg, pad_id, eos_id)


def _evaluate(model, examples, cfg, pad_id, eos_id) -> float:
    args = model.args
    total, count = 0.0, 0
    for b in range(cfg.val_batches):
        chunk = examples[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if not chunk:
            break
        batch = make_batch(chunk, args, pad_id, eos_id)
        noise = draw_noise(np.random.default_rng([cfg.seed, b, 2]), batch, args.vocab_size, args.canvas_length,
                           cfg.t_min, cfg.sc_prob)
        loss, _, _ = loss_terms(model, batch, noise, cfg.ar_weight)
        total += loss.item() * len(chunk)
        count += len(chunk)
    return total / max(count, 1)


def train(
    model,
    train_set: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    eos_id: int,
    valid_set: list[Example] | None = None,
    save_path: Path | None = None,
    resume: bool = False,
    meta: dict | None = None,
    on_save=None,
    stream=None,
    quiet: bool = False,
) -> list[float]:
    """Run `cfg.iters` steps on the model's trainable parameters; returns the loss of every step run."""
    schedule = make_schedule(cfg)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    meta = {"seed": cfg.seed, "batch_size": cfg.batch_size, **(meta or {})}
    start = 0
    if resume and save_path is not None:
        found = latest_checkpoint(save_path)
        if found is not None:
            start = load_checkpoint(found, model, optimizer, meta)
            if not quiet:
                print(f"[INFO] Resuming from {found} (step {start})", file=stream or sys.stdout)
    model.train()
    loss_and_grad = nn.value_and_grad(model, lambda m, b, n: loss_terms(m, b, n, cfg.ar_weight))
    progress = Progress(cfg.iters, start, cfg.steps_per_report, stream) if not quiet else None
    with training_activations(model):
        losses = _loop(model, train_set, cfg, start, optimizer, schedule, loss_and_grad, progress, pad_id, eos_id,
                       valid_set, save_path, meta, on_save)
    model.eval()
    return losses


def _loop(model, train_set, cfg, start, optimizer, schedule, loss_and_grad, progress, pad_id, eos_id, valid_set,
          save_path, meta, on_save):
    args = model.args
    losses = []
    C = args.canvas_length
    lengths = [canvases_needed(e, C) * C + len(e.prompt) for e in train_set]
    for step in range(start + 1, cfg.iters + 1):
        examples = [train_set[i] for i in batch_indices(lengths, cfg.batch_size, step - 1, cfg.seed)]
        batch = make_batch(examples, args, pad_id, eos_id)
        rng = np.random.default_rng([cfg.seed, step, 1])
        noise = draw_noise(rng, batch, args.vocab_size, args.canvas_length, cfg.t_min, cfg.sc_prob)
        mx.random.seed(int(rng.integers(0, 2**31)))  # LoRA dropout
        (loss, _, _), grads = loss_and_grad(model, batch, noise)
        if cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: the loss is {value}; lower --learning-rate or check the data")
        losses.append(value)
        extra = ""
        if valid_set and cfg.steps_per_eval and (step % cfg.steps_per_eval == 0 or step == cfg.iters):
            model.eval()
            extra = f" | val {evaluate(model, valid_set, cfg, pad_id, eos_id):.4f}"
            model.train()
        if progress is not None:
            lr = schedule(step - 1) if callable(schedule) else schedule
            progress.update(step, value, batch.tokens, float(lr), extra)
            if extra and not progress.tty and step % progress.every:
                progress.note(f"step {step}:{extra.lstrip(' |')}")
        if save_path is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
            folder = save_checkpoint(save_path, step, model, optimizer, meta)
            if on_save is not None:
                on_save(step)
            if progress is not None:
                progress.note(f"[INFO] Saved checkpoint {folder}")
    return losses
