"""What the command lines (generate, chat) share: flag parsing, the diffusion flags, loading the model named on
the command line (or the bundled demo), and error messages worded with the flag the user typed.

Kept free of MLX imports so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_PREFILL_STEP, IMAGE_SOFT_TOKEN_BUDGETS, SAMPLER_FLAGS  # noqa: F401  (SAMPLER_FLAGS: for the command lines)
from .watchdog import DEFAULT_PEER_TIMEOUT


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


def add_distributed_flags(p: argparse.ArgumentParser):
    """Several machines (or processes): start the command with `mlx.launch`, as mlx-lm's are started."""
    g = p.add_argument_group("several machines (start the command with mlx.launch)")
    g.add_argument("--pipeline", action="store_true", help="Split the layers across the ranks (pools memory).")
    g.add_argument("--experts-parallel", action="store_true",
                   help="Give each rank 1/N of every layer's experts (works quantized; one all_sum per layer).")
    g.add_argument("--partial-sums", action="store_true",
                   help="With --experts-parallel: all-sum each rank's weighted sum of its experts instead of every "
                   "expert's output (1/top_k the bytes per layer; the output then differs from one process by rounding).")
    g.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT, metavar="SECONDS",
                   help="End the run when a pass waits this long on another rank (one that is stuck, not dead; "
                   f"default {DEFAULT_PEER_TIMEOUT:g}).")
    g.add_argument("--pipeline-split", help="With --pipeline: layers per rank in proportion, e.g. 2,1 for a Mac "
                   "with twice the memory as rank 0 (default: even).")


def parallel_mode(args) -> str | None:
    """'pipeline', 'experts' or None, from the distributed flags (absent flags: None)."""
    pipeline, experts = getattr(args, "pipeline", False), getattr(args, "experts_parallel", False)
    if pipeline and experts:
        raise ValueError("--pipeline and --experts-parallel exclude each other: choose one")
    if getattr(args, "pipeline_split", None) and not pipeline:
        raise ValueError("--pipeline-split needs --pipeline")
    if getattr(args, "partial_sums", False) and not experts:
        raise ValueError("--partial-sums needs --experts-parallel")
    if getattr(args, "peer_timeout", DEFAULT_PEER_TIMEOUT) <= 0:
        raise ValueError(f"--peer-timeout must be positive, got {args.peer_timeout}")
    if (pipeline or experts) and getattr(args, "adapter_path", None):
        raise ValueError("--adapter-path is not supported with --pipeline or --experts-parallel yet")
    return "pipeline" if pipeline else "experts" if experts else None


def load_for_cli(model_path: str | None, adapter_path: str | None = None, args=None):
    """The model named on the command line, or the bundled demo model (with a hint about the real one).

    With --pipeline/--experts-parallel (in `args`) under mlx.launch, only rank 0 returns; the other ranks serve it
    and then exit."""
    from . import demo
    from .loading import load

    mode = parallel_mode(args) if args is not None else None
    if model_path is None:
        if not demo.available():
            raise ValueError("no --model given and the bundled demo model is missing from this install")
        print(demo.RELEASED_MODEL_HINT, file=sys.stderr)
        print(demo.banner(), file=sys.stderr)
        model_path = str(demo.FOLDER)
    if mode is not None:
        from .distributed import load_distributed, parse_split

        return load_distributed(model_path, mode, parse_split(args.pipeline_split),
                                exact=not getattr(args, "partial_sums", False),
                                peer_timeout=getattr(args, "peer_timeout", DEFAULT_PEER_TIMEOUT))
    return load(model_path, adapter_path=adapter_path)


def lost_rank_message(error: BaseException) -> str | None:
    """`parallel.lost_rank_message`, imported when an error needs it (this module loads no MLX)."""
    from .parallel import lost_rank_message

    return lost_rank_message(error)


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
