"""`python -m mlx_dgemma.fuse` (also `python -m mlx_dgemma.lora`): fuse LoRA adapters into a model folder.

    python -m mlx_dgemma.fuse --model dgemma-bf16 --adapter-path adapters --save-path dgemma-tuned
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_dgemma.fuse", description="Fuse LoRA adapters into a model folder.")
    p.add_argument("--model", required=True, help="The base model folder (or Hub id).")
    p.add_argument("--adapter-path", required=True, help="The adapter folder written by mlx_dgemma.train.")
    p.add_argument("--save-path", required=True, help="Output folder for the fused model (must not exist).")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .checkpoint import resolve_checkpoint
    from .loading import load
    from .lora import fuse_model
    from .trainer import save_model

    try:
        out = Path(args.save_path)
        if out.exists():
            raise ValueError(f"{out}: already exists")
        model, _ = load(args.model, adapter_path=args.adapter_path)
        n = fuse_model(model)
        save_model(model, resolve_checkpoint(args.model), out)
        print(f"[INFO] Fused {n} adapters into {out}")
        return 0
    except ValueError as e:  # AdapterError, and the loader's errors, name the file
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
