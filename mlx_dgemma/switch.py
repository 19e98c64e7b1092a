"""Expert layers: every expert's linear map in one stacked weight, applied to rows by expert index, and the
routed experts of a decoder layer (`Experts`) built from them.

`ExpertLinear` holds `weight` `[E, out, in]` and runs MLX's gathered matmul; `QuantizedExpertLinear` holds the
packed weight with its `scales` (and `biases` in affine mode), under the same checkpoint names, and runs the
gathered quantized matmul. `nn.quantize` turns the first into the second through `to_quantized`.

Ours rather than mlx-lm's: importing `mlx_lm` imports transformers (seconds per start, torch too where it is
installed), for two small classes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import backend
from .config import ModelArgs

__all__ = ["ExpertLinear", "Experts", "QuantizedExpertLinear", "widen_cpu_experts"]


class ExpertLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """`x` `[..., rows, in]` and one expert index per leading position: `[..., rows, out]`."""
        y = mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedExpertLinear":
        return QuantizedExpertLinear.from_weights(self.weight, self.get("bias"), group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        parts = mx.quantize(mx.zeros((num_experts, output_dims, input_dims)), group_size, bits, mode=mode)
        self._set(parts, mx.zeros((num_experts, output_dims)) if bias else None)

    def _set(self, parts, bias):
        self.weight, self.scales = parts[0], parts[1]
        if len(parts) > 2:  # affine mode's per-group offsets; the mx formats have none
            self.biases = parts[2]
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_weights(cls, weight: mx.array, bias, group_size: int, bits: int, mode: str) -> "QuantizedExpertLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = group_size, bits, mode
        layer._set(mx.quantize(weight, group_size, bits, mode=mode), bias)
        return layer

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y


class Experts(nn.Module):
    """The routed experts: `gate_up_proj` `[E, 2*Ie, H]` (gate rows first, then up) and `down_proj` `[E, H, Ie]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = ExpertLinear(args.hidden_size, 2 * args.moe_intermediate_size, args.num_experts, bias=False)
        self.down_proj = ExpertLinear(args.moe_intermediate_size, args.hidden_size, args.num_experts, bias=False)
        self.num_experts = args.num_experts

    def _glu(self, x, indices, sorted_indices):
        gate, up = mx.split(self.gate_up_proj(x, indices, sorted_indices=sorted_indices), 2, axis=-1)
        return self.down_proj(nn.gelu_approx(gate) * up, indices, sorted_indices=sorted_indices)

    # This module holds experts `[first, first + num_experts)` of a layer's `layout_experts`: all of them in one
    # process; one rank's share under --experts-parallel (sharded.py), which lays the rows out for every expert
    # exactly as one process does, so each row's output has the same bits (a gathered matmul's rounding depends on
    # where a row sits in its block).
    first = 0
    layout_experts = None

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        shape = x.shape
        y = self.expert_rows(x.reshape(-1, shape[-1]), idx.reshape(-1, idx.shape[-1]).astype(mx.uint32))
        return self.combine(y, weights).reshape(shape)

    def expert_rows(self, x: mx.array, idx: mx.array) -> mx.array:
        """Every (token, slot)'s expert output, `[n, k, H]` for `x` `[n, H]` and `idx` `[n, k]` (uint32)."""
        profile = backend.current()
        if not profile.blocked_experts:
            return self._sorted_rows(x, idx)
        # the block from the whole layer's expert count, so every rank lays the rows out as one process does
        return self._blocked(x, idx, profile.expert_block(idx.size, self.layout_experts or self.num_experts))

    @staticmethod
    def combine(y: mx.array, weights: mx.array) -> mx.array:
        """The routing-weighted sum over the k slots."""
        return (y * weights.reshape(*y.shape[:2], 1).astype(y.dtype)).sum(axis=1)

    def _held(self, experts: mx.array) -> mx.array:
        # layout expert -> index into this module's weights; experts held elsewhere read a stand-in (their rows
        # are dropped by the caller)
        if self.first == 0 and self.layout_experts in (None, self.num_experts):
            return experts
        return mx.clip(experts.astype(mx.int32) - self.first, 0, self.num_experts - 1).astype(mx.uint32)

    def _sorted_rows(self, x, idx):
        # GPU profile: one row per (token, expert) pair, sorted by expert so the gathered matmul reads each
        # expert's weights once.
        n, k = idx.shape
        flat = idx.flatten()
        order = mx.argsort(flat)
        y = self._glu(x[order // k][:, None, :], self._held(flat[order]), True)
        return y[mx.argsort(order)].reshape(n, k, -1)

    def _blocked(self, x, idx, block: int):
        # CPU profile: row-by-row gathered matmuls run at matrix-vector speed on a CPU. Lay the (token, expert)
        # rows out in blocks of `block` rows that all belong to one expert (each expert's rows padded to a
        # multiple of `block`), so every block is a real matrix-matrix product. Shapes depend only on the
        # number of tokens, never on the routing, so nothing is read back to the host.
        n, k = idx.shape
        rows, e = n * k, self.layout_experts or self.num_experts
        n_blocks = -(-rows // block) + e
        flat = idx.flatten().astype(mx.int32)
        order = mx.argsort(flat)
        expert_of_sorted = flat[order]
        counts = (flat[:, None] == mx.arange(e)[None, :]).sum(axis=0)
        padded = ((counts + block - 1) // block) * block
        padded_end = mx.cumsum(padded)
        count_start = mx.cumsum(counts) - counts
        rank = mx.arange(rows) - count_start[expert_of_sorted]
        slot = (padded_end - padded)[expert_of_sorted] + rank
        token_of_slot = mx.full((n_blocks * block,), n, dtype=mx.int32)  # n = the zero row appended below
        token_of_slot[slot] = order // k
        xs = mx.concatenate([x, mx.zeros((1, x.shape[-1]), dtype=x.dtype)])[token_of_slot]
        block_expert = (padded_end[None, :] <= (mx.arange(n_blocks) * block)[:, None]).sum(axis=1)
        block_expert = self._held(mx.minimum(block_expert, e - 1).astype(mx.uint32))
        if isinstance(self.gate_up_proj, ExpertLinear) and self.gate_up_proj.weight.dtype != xs.dtype:
            xs = xs.astype(self.gate_up_proj.weight.dtype)  # half-precision experts were widened at load (see `widen_cpu_experts`)
        y = self._glu(xs.reshape(n_blocks, block, -1), block_expert, True).reshape(n_blocks * block, -1)
        y = y.astype(x.dtype)
        slot_of_row = mx.zeros((rows,), dtype=mx.int32)
        slot_of_row[order] = slot
        return y[slot_of_row].reshape(n, k, -1)


def widen_cpu_experts(model) -> bool:
    """Float32 expert weights for MLX's CPU backend, whose gathered matmul takes float32 only (a bfloat16 folder
    would fail there). Costs twice the experts' memory; quantized experts are left alone. Returns whether any
    weights changed."""
    changed = False
    for layer in model.layers:
        for proj in (layer.experts.gate_up_proj, layer.experts.down_proj):
            if isinstance(proj, ExpertLinear) and proj.weight.dtype != mx.float32:
                proj.weight = proj.weight.astype(mx.float32)
                changed = True
    return changed
