"""Running one model on several processes (`mlx.launch`, then `--pipeline` or `--experts-parallel`): each rank
loads only its part of the folder, the ranks agree that every part loaded, and the ranks other than 0 serve rank 0.

See `sharded.py` for how the model is split and how rank 0 drives the others.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
from pathlib import Path

import mlx.core as mx

from . import backend
from .config import ModelArgs, SamplerConfig, read_json
from .conversion_plan import make_plan, source_dtype
from .cpu import keep_buffers
from .model import VISION_PREFIXES, checkpoint_name
from .parallel import (
    MODES,
    DistributedError,
    expert_range,
    parse_split,
    peer_lost,
    split_layers,
)
from .quantize import apply_to_model
from .sharded import ShardedModel
from .switch import widen_cpu_experts
from .watchdog import DEFAULT_PEER_TIMEOUT
from .weights import list_tensors

__all__ = ["MODES", "DistributedError", "ShardedModel", "expert_range", "parse_split", "peer_lost", "split_layers",
           "load_shard", "load_distributed", "init_group"]  # the sharded names re-exported for callers
_LAYER = re.compile(r"layers\.(\d+)\.")


# --- loading ---------------------------------------------------------------------------------------------------------


def _wanted(name: str, rank: int, owned: range) -> bool:
    if name.startswith(VISION_PREFIXES):
        return False
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) in owned
    return rank == 0 or name.startswith("norm.")


def load_shard(folder: Path, group, mode: str, split: list[float] | None = None, exact: bool = True,
               peer_timeout: float = DEFAULT_PEER_TIMEOUT) -> ShardedModel:
    """This rank's part of a converted (or Hugging Face) folder: only its tensors are read, experts by row range.
    `exact=False`: experts mode all-sums each rank's weighted sum (1/top_k the bytes, not bit-identical).
    `peer_timeout`: seconds a pass may wait on the other ranks before this rank ends (see `watchdog.py`)."""
    if mode not in MODES:
        raise DistributedError(f"unknown parallel mode {mode!r} (choose from {', '.join(MODES)})")
    keep_buffers()
    folder = Path(folder)
    config = read_json(folder / "config.json")
    args = ModelArgs.from_dict(config, source=str(folder / "config.json"))
    rank, size = group.rank(), group.size()
    if mode == "pipeline":
        layers, experts = split_layers(args.num_hidden_layers, size, split)[rank], range(args.num_experts)
    else:
        if split is not None:
            raise DistributedError("--pipeline-split applies to --pipeline, not --experts-parallel")
        layers, experts = range(args.num_hidden_layers), expert_range(args.num_experts, rank, size)
    tensors = list_tensors(folder)
    make_plan(  # checks every name and shape against the config, naming file and key
        args, config, tensors, dtype=source_dtype(config, tensors), quantize=False, bits=None, group_size=None,
        mode="affine", recipe="mixed", dequantize=False, folder=folder,
    )
    weights = {}
    for t in tensors:
        name = checkpoint_name(t.name)
        if name is None or not _wanted(name, rank, layers):
            continue
        sharded = mode == "experts" and ".experts." in name and len(experts) < args.num_experts
        weights[name] = t.read(experts.start, experts.stop) if sharded else t.read()
    model = ShardedModel(args, group, mode, layers, experts, exact, peer_timeout)
    if config.get("quantization"):
        apply_to_model(model, config["quantization"], weights)
    model.load_weights(list(weights.items()), strict=True)
    if backend.on_cpu():
        widen_cpu_experts(_Layers([model.layers[i] for i in layers]))
    model.sampler_defaults = SamplerConfig.from_folder(folder, args)
    model.eval()
    mx.eval(model.state)
    model.wire()
    return model


class _Layers:
    def __init__(self, layers):
        self.layers = layers


# --- starting a run ---------------------------------------------------------------------------------------------------


def init_group():
    """The group `mlx.launch` set up (ring, JACCL or MPI); a group of one when not launched."""
    return mx.distributed.init()


def _agree(group, error: BaseException | None):
    """Every rank reports whether it loaded; a failure anywhere stops every rank with the failing rank's reason."""
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:480]
    mine = mx.array(list(text.ljust(512, b"\0")), dtype=mx.uint8)[None]
    everyone = mx.distributed.all_gather(mine, group=group)
    failures = {}  # reason -> ranks (a folder or world-size problem usually fails every rank alike)
    for rank, row in enumerate(everyone.tolist()):
        reason = bytes(row).rstrip(b"\0").decode(errors="replace")
        if reason:
            failures.setdefault(reason, []).append(str(rank))
    if failures:
        raise DistributedError("; ".join(
            f"rank{'s' if len(r) > 1 else ''} {', '.join(r)}: {reason}" for reason, r in failures.items()
        ))


def load_distributed(path: str, mode: str, split: list[float] | None = None, group=None, exact: bool = True,
                     peer_timeout: float = DEFAULT_PEER_TIMEOUT):
    """`(model, tokenizer)` on rank 0. On every other rank this serves rank 0 and then ends the process, so the
    command line that called it carries on as rank 0 only (the rank that prints and serves)."""
    from .checkpoint import resolve_checkpoint
    from .tokenizer import load_tokenizer

    group = group or init_group()
    model = error = None
    try:
        folder = resolve_checkpoint(str(path))
        model = load_shard(folder, group, mode, split, exact, peer_timeout)
    except Exception as e:  # reported to every rank below
        error = e
    if group.size() == 1:
        if error is not None:
            raise error
    else:
        try:
            _agree(group, error)
        except DistributedError:
            if group.rank() == 0:
                raise
            sys.exit(1)  # rank 0 prints why
    if group.rank() != 0:
        try:
            model.serve()
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            print(f"error: rank {group.rank()}: lost rank 0 ({e}); exiting", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    atexit.register(model.close)
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return model, load_tokenizer(folder)


def _stopped_by_launcher(signum, frame):
    # mlx.launch ends the other ranks when one exits with an error (and a server stops itself when it loses a
    # rank); say so rather than vanish.
    print("error: another rank left the run (this rank was stopped); start every rank again", file=sys.stderr,
          flush=True)
    os._exit(1)


def free_starting_port(ranks: int = 2) -> int:
    """A port p with p .. p + ranks - 1 free on 127.0.0.1: `mlx.launch --starting-port p` gives rank r port p + r
    (two ranks on one machine, as the tests and benchmarks/distributed.py run them)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for r in range(1, ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + r))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {ranks} consecutive free ports on 127.0.0.1")
