"""How the model is split across the ranks of a distributed run, and the layers each parallel mode adds to it.

`sharded.py` builds one rank's model from these and runs the passes; `distributed.py` loads it.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .switch import Experts

MODES = ("pipeline", "experts")


class DistributedError(ValueError):
    """The ranks cannot run this model together (world size, split, a rank's folder, a rank that left)."""


def peer_lost(error: BaseException) -> bool:
    """Whether an error is MLX's ring backend reporting that another rank went away."""
    return isinstance(error, RuntimeError) and "[ring]" in str(error)


def lost_rank_message(error: BaseException) -> str | None:
    """What to tell the user when another rank of a distributed run went away; None for any other error."""
    if peer_lost(error):
        return f"another rank left the run ({error}); start every rank again"
    return None


# --- how the model is split ----------------------------------------------------------------------------------------


def split_layers(n_layers: int, size: int, weights: list[float] | None = None) -> list[range]:
    """Consecutive layer ranges, rank 0 first: even by default, else in proportion to `weights` (one per rank,
    e.g. a Mac's memory), every rank getting at least one layer."""
    if size > n_layers:
        raise DistributedError(f"{size} ranks cannot share {n_layers} layers in a pipeline (at most one rank per layer)")
    weights = [1.0] * size if weights is None else [float(w) for w in weights]
    if len(weights) != size:
        raise DistributedError(f"--pipeline-split has {len(weights)} entries for {size} ranks")
    if any(w <= 0 for w in weights):
        raise DistributedError(f"--pipeline-split entries must be positive, got {weights}")
    share = [w / sum(weights) * n_layers for w in weights]
    counts = [max(1, int(s)) for s in share]
    while sum(counts) < n_layers:  # largest remainder first
        counts[max(range(size), key=lambda r: share[r] - counts[r])] += 1
    while sum(counts) > n_layers:
        counts[max((r for r in range(size) if counts[r] > 1), key=lambda r: counts[r] - share[r])] -= 1
    starts = [sum(counts[:r]) for r in range(size)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def expert_range(num_experts: int, rank: int, size: int) -> range:
    if num_experts % size:
        raise DistributedError(f"{num_experts} experts per layer do not divide among {size} ranks (--experts-parallel)")
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


def parse_split(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise DistributedError(f"--pipeline-split {text!r}: expected comma-separated numbers, e.g. 2,1") from None


# --- the pieces each mode adds to the model ------------------------------------------------------------------------


class ShardedExperts(Experts):
    """This rank's experts `[first, first + count)` of one layer, and one `all_sum` that joins the ranks' shares.

    Exact (the default): every rank fills the `[tokens, top_k, hidden]` expert outputs of the slots it owns
    (zeros in the others' slots), one `all_sum` makes the whole tensor on every rank (x + 0 is exact), and each
    rank sums the slots by routing weight as one process does: the same bits as one process, top_k times the
    bytes. Partial sums (`exact=False`): each rank sums its own slots and the `all_sum` adds the ranks' sums, a
    different association than one process's sum over the top_k slots, so the output differs by rounding."""

    def __init__(self, args: ModelArgs, first: int, count: int, group, exact: bool = True):
        super().__init__(replace(args, num_experts=count))
        self.first, self.layout_experts, self.group, self.exact = first, args.num_experts, group, exact

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        shape = x.shape
        idx = idx.reshape(-1, idx.shape[-1]).astype(mx.uint32)
        weights = weights.reshape(idx.shape)
        local = ((idx >= self.first) & (idx < self.first + self.num_experts))[..., None]
        y = mx.where(local, self.expert_rows(x.reshape(-1, shape[-1]), idx), 0)
        if self.exact:
            return self.combine(mx.distributed.all_sum(y, group=self.group), weights).reshape(shape)
        return mx.distributed.all_sum(self.combine(y, weights), group=self.group).reshape(shape)


def check_announced(announced):
    # A pass that reaches the other ranks without being announced (a loop that drives `model.layers` itself, as
    # the fast sampler's compacted decoder does) would leave them waiting for a header that never comes.
    if not announced.on:
        raise DistributedError("this decoding path is not supported with --pipeline or --experts-parallel yet "
                               "(use the reference sampler)")


class Broadcast(nn.Module):
    """Experts mode, rank 0: the first layer, after handing its input to every rank."""

    def __init__(self, layer, group, dtype, announced):
        super().__init__()
        self.layer, self.group, self.layer_type, self.dtype = layer, group, layer.layer_type, dtype
        self.announced = announced

    @property
    def self_attn(self):  # for the cache's RoPE shifts (`Cache.reframe`)
        return self.layer.self_attn

    def __call__(self, h, *args, **kwargs):
        check_announced(self.announced)
        return self.layer(mx.distributed.all_sum(h.astype(self.dtype), group=self.group), *args, **kwargs)


class Hop(nn.Module):
    """Pipeline, rank 0: stands for the later ranks' layers. Sends h to rank 1 and gets the last rank's h back."""

    def __init__(self, group, layer_type: str, dtype, announced):
        super().__init__()
        self.group, self.layer_type, self.dtype, self.announced = group, layer_type, dtype, announced

    def __call__(self, h, *args, **kwargs):
        check_announced(self.announced)
        sent = mx.distributed.send(h.astype(self.dtype), 1, group=self.group)  # the dtype rank 1 expects
        return mx.distributed.all_sum(mx.depends(mx.zeros_like(h), sent), group=self.group)


class Flag:
    """An on/off switch shared by the model and its collective layers, on for the span of `with flag:`."""

    def __init__(self):
        self.on = False

    def __enter__(self):
        self.on = True

    def __exit__(self, *exc):
        self.on = False
