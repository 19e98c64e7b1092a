"""What the command lines (generate, chat) share: flag parsing, the diffusion flags, loading the model named on
the command line (or the bundled demo), and error messages worded with the flag the user typed.

Kept free of MLX imports so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_PREFILL_STEP, IMAGE_SOFT_TOKEN_BUDGETS, SAMPLER_FLAGS  # noqa: F401  (SAMPLER_FLAGS: for the command lines)


class Parser(argparse.ArgumentParser):
    """Bad flags get one line, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def str2bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_sampler_flags(p: argparse.ArgumentParser):
    """The diffusion flags shared by generate and chat; None means the model's generation_config.json."""
    p.add_argument("--steps", type=int, dest="max_denoising_steps", help="Denoising steps per canvas (default 48).")
    p.add_argument("--entropy-bound", type=float, help="Entropy bound for accepting tokens (default 0.1).")
    p.add_argument("--t-min", type=float, help="Temperature at the last step (default 0.4).")
    p.add_argument("--t-max", type=float, help="Temperature at the first step (default 0.8).")
    p.add_argument("--stability-threshold", type=int, help="Steps the argmax canvas must stay unchanged (default 1).")
    p.add_argument("--confidence-threshold", type=float, help="Mean entropy below which a canvas is done (default 0.005).")
    p.add_argument("--sampler", choices=("reference", "fast"),
                   help="reference: the reference's loop (default); fast: the fast sampler (fewer positions computed).")
    p.set_defaults(fast_sampler=None)  # the fast sampler's levers: generation_config.json or the API, no flag
    p.add_argument("--eos-token-id", type=int, action="append", dest="eos_token_ids", metavar="ID",
                   help="End generation at this token id (repeat for several; replaces the model's).")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=False, help="Thinking mode.")
    p.add_argument("--seed", type=int, help="Random seed (default: fresh noise each run).")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP, help="Prompt tokens per encoder chunk.")


def add_image_flags(p: argparse.ArgumentParser):
    p.add_argument("--image", action="append", metavar="PATH",
                   help="An image for the prompt (repeatable; placed before the text). Needs a model with a vision tower.")
    p.add_argument("--max-soft-tokens", type=int, choices=IMAGE_SOFT_TOKEN_BUDGETS,
                   help="Soft tokens per image at most (default: the model folder's processor config, 280).")


def load_for_cli(model_path: str | None, adapter_path: str | None = None):
    """The model named on the command line, or the bundled demo model (with a hint about the real one)."""
    from . import demo
    from .loading import load

    if model_path is None:
        if not demo.available():
            raise ValueError("no --model given and the bundled demo model is missing from this install")
        print(demo.RELEASED_MODEL_HINT, file=sys.stderr)
        model_path = str(demo.FOLDER)
    return load(model_path, adapter_path=adapter_path)


def check_positive_flags(args):
    """The budget flags both command lines share, which argparse checks only for type."""
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.prefill_step_size <= 0:
        raise ValueError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")


FLAG_NAMES = {"max_denoising_steps": "--steps", "max_new_tokens": "--max-tokens", "entropy_bound": "--entropy-bound",
              "t_min": "--t-min", "t_max": "--t-max", "stability_threshold": "--stability-threshold",
              "confidence_threshold": "--confidence-threshold", "sampler": "--sampler",
              "eos_token_ids": "--eos-token-id"}


def flag_message(error: Exception) -> str:
    """A sampler-setting error worded with the command-line flag the user typed."""
    message = str(error)
    field = message.split("=", 1)[0]
    return FLAG_NAMES[field] + message[len(field):] if field in FLAG_NAMES else message
