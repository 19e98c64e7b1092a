"""Fine-tune (or train from scratch) a DiffusionGemma with the block-diffusion objective, in MLX.

    python -m mlx_dgemma.train --model PATH --data DATA [--fine-tune-type lora|full] --iters 1000

`DATA` is a folder holding `train.jsonl` (and optionally `valid.jsonl`) or one `.jsonl` file. Each line is
`{"prompt": "...", "completion": "..."}` or `{"messages": [{"role": "user", "content": ...}, ...,
{"role": "assistant", "content": ...}]}`; prompts go through the model's chat template (as generation renders
them), and the last assistant message is the answer that is trained.

The objective (as the public DiffusionGemma fine-tuning recipes define it):

- The encoder reads the prompt and the answer's clean canvases causally into the KV cache; gradients flow through
  the cache into the shared weights.
- The answer, closed and filled to whole canvases with EOS, is cut into canvases of `canvas_length` tokens.
  Every canvas is trained at once with a block-causal decoder view: canvas k sees the prompt and the clean
  canvases before it (the last `sliding_window - 1` of those tokens on sliding layers), at the positions generation
  gives it, plus itself bidirectionally.
- Uniform-state corruption: per canvas t ~ U(0.001, 1); each position becomes a uniformly random vocabulary id
  with probability t (there is no mask token).
- Two-pass self-conditioning: a first decoder pass without gradients; for half of the examples its distribution
  is fed to the second pass as self-conditioning, the others get none. The loss is on the second pass.
- Loss: mean cross-entropy over every canvas position (corrupted or not, the EOS fill included), no 1/t weight;
  answers of several canvases add the encoder's autoregressive cross-entropy on their clean canvases (weight 1).

A run is a pure function of its seed: the data order, the corruption and self-conditioning draws of step `s`
depend only on (seed, s), so a resumed run continues exactly as the uninterrupted one would have.

The library lives below: the data in `train_data.py`, the loss in `train_objective.py`, the loop, saving and
checkpoints in `trainer.py`. Their names are re-exported here (imported on first use, so that `--help` does not
load MLX).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .reexports import lazy_reexports

_LIBRARY = {
    "train_data": ("GROUP", "DataError", "Example", "read_jsonl", "tokenize", "load_examples", "canvases_needed",
                   "check_budget", "data_files", "Batch", "make_batch", "Noise", "draw_noise", "batch_indices"),
    "train_objective": ("gelu_tanh", "training_activations", "decode_canvases", "loss_terms", "_training_cache",
                        "_cache_rows"),
    "trainer": ("CHECKPOINTS", "FROZEN_BUFFERS", "init_weights", "build_model", "save_model", "save_checkpoint",
                "latest_checkpoint", "load_checkpoint", "TrainConfig", "make_schedule", "Progress", "evaluate",
                "train"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.train",
        description="Fine-tune a DiffusionGemma (LoRA or full) with the block-diffusion objective.",
    )
    p.add_argument("--model", required=True, help="Model folder or Hugging Face repo id.")
    p.add_argument("--data", required=True, help="Folder with train.jsonl (and valid.jsonl), or one .jsonl file.")
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora")
    p.add_argument("--from-scratch", action="store_true",
                   help="Ignore any weights in --model: start from random weights built from its config.json.")
    p.add_argument("--save-path", help="Where the adapters (lora) or the model (full) go. "
                                       "Default: adapters / trained_model.")
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --save-path.")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, help="Default: 1e-4 (lora), 1e-5 (full).")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="Linear warm-up steps.")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="Clip the gradient norm (0: off).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-layers", type=int, default=-1, help="Adapt the last N layers (-1: all).")
    p.add_argument("--lora-keys", nargs="+", help="Linear layers to adapt. Default: attention q/k/v/o and the dense MLP.")
    p.add_argument("--max-canvases", type=int, default=4, help="Most canvases an answer may span.")
    p.add_argument("--max-seq-length", type=int, default=4096, help="Most tokens per example (prompt + canvases).")
    p.add_argument("--no-chat-template", action="store_true", help="Use prompts as plain text (prompt/completion data).")
    p.add_argument("--sc-prob", type=float, default=0.5, help="Share of examples trained with self-conditioning.")
    p.add_argument("--t-min", type=float, default=0.001, help="Smallest corruption level.")
    p.add_argument("--ar-weight", type=float, default=1.0, help="Weight of the encoder's autoregressive loss.")
    p.add_argument("--steps-per-report", type=int, default=10)
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps (0: only at the end).")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved model (full fine-tuning). Default: the training dtype.")
    return p


def run(argv=None) -> Path:
    a = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from .checkpoint import resolve_checkpoint
    from .config import ModelArgs
    from .lora import DEFAULT_KEYS, apply_lora, save_adapters
    from .tokenizer import load_tokenizer
    from .train_data import DataError, check_budget, data_files, load_examples
    from .trainer import FROZEN_BUFFERS, TrainConfig, build_model, save_model, train
    from .weights import DTYPE_NAMES

    a = build_parser().parse_args(argv)
    folder = resolve_checkpoint(a.model)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise DataError(f"{folder}: has no tokenizer.json or tokenizer.model; training needs the model's tokenizer")
    args = ModelArgs.from_file(folder / "config.json")
    train_path, valid_path = data_files(Path(a.data))
    train_set = load_examples(train_path, tokenizer, not a.no_chat_template)
    check_budget(train_set, train_path, args.canvas_length, a.max_canvases, a.max_seq_length)
    valid_set = None
    if valid_path is not None:
        valid_set = load_examples(valid_path, tokenizer, not a.no_chat_template)
        check_budget(valid_set, valid_path, args.canvas_length, a.max_canvases, a.max_seq_length)

    model = build_model(folder, a.from_scratch, a.seed)
    eos_ids = model.sampler_defaults.eos_token_ids or args.eos_token_ids
    if not eos_ids:
        raise DataError(f"{folder}: no EOS id in generation_config.json or config.json; the EOS fill needs one")
    eos_id = eos_ids[0]
    pad_id = args.pad_token_id if args.pad_token_id is not None else 0

    save_path = Path(a.save_path or ("adapters" if a.fine_tune_type == "lora" else "trained_model"))
    lora_config = None
    if a.fine_tune_type == "lora":
        if a.from_scratch:
            raise ValueError("--from-scratch trains every weight: use --fine-tune-type full")
        keys = a.lora_keys or list(DEFAULT_KEYS)
        lora_config = {"rank": a.lora_rank, "scale": a.lora_scale, "dropout": a.lora_dropout, "keys": keys,
                       "num_layers": a.lora_layers}
        mx.random.seed(a.seed)
        n = apply_lora(model, a.lora_rank, a.lora_scale, a.lora_dropout, keys, a.lora_layers)
        print(f"[INFO] LoRA on {n} linear layers (rank {a.lora_rank}); router, experts and the rest frozen")
    else:
        if any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
            raise ValueError("full fine-tuning needs float weights; this model is quantized (use LoRA, or convert "
                             "with --dequantize first)")
        model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                              model.parameters()))
        for layer in model.layers:
            layer.freeze(keys=list(FROZEN_BUFFERS), recurse=False)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[INFO] Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"[INFO] {len(train_set)} training examples" + (f", {len(valid_set)} validation" if valid_set else ""))

    lr = a.learning_rate if a.learning_rate is not None else (1e-4 if a.fine_tune_type == "lora" else 1e-5)
    cfg = TrainConfig(
        iters=a.iters, batch_size=a.batch_size, learning_rate=lr, lr_schedule=a.lr_schedule, warmup=a.warmup,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip or None, seed=a.seed, t_min=a.t_min, sc_prob=a.sc_prob,
        ar_weight=a.ar_weight, steps_per_report=a.steps_per_report, steps_per_eval=a.steps_per_eval,
        val_batches=a.val_batches, save_every=a.save_every,
    )
    meta = {"fine_tune_type": a.fine_tune_type}
    save_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    losses = train(model, train_set, cfg, pad_id=pad_id, eos_id=eos_id, valid_set=valid_set, save_path=save_path,
                   resume=a.resume, meta=meta)
    # `train` returns the losses of the steps it ran: fewer than --iters after --resume
    if losses:
        steps = f"{len(losses)} step" + ("s" if len(losses) != 1 else "")
        print(f"[INFO] Trained {steps} in {time.perf_counter() - start:.1f} s")
    else:
        print(f"[INFO] Nothing to train: the checkpoint in {save_path} is already at step {cfg.iters}")
    if lora_config is not None:
        save_adapters(model, save_path, lora_config)
        print(f"[INFO] Saved adapters to {save_path} (load with mlx_dgemma.load(model, adapter_path=...))")
    else:
        save_model(model, folder, save_path, DTYPE_NAMES[a.save_dtype] if a.save_dtype else None)
        print(f"[INFO] Saved the model to {save_path}")
    return save_path


def main(argv=None):
    try:
        run(argv)
        return 0
    except (ValueError, FloatingPointError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted (resume with --resume from the last checkpoint)", file=sys.stderr)
        return 130


lazy_reexports(__name__, _LIBRARY)

if __name__ == "__main__":
    sys.exit(main())
