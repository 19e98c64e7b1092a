"""Expert layers: every expert's linear map in one stacked weight, applied to rows by expert index.

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

__all__ = ["ExpertLinear", "QuantizedExpertLinear"]


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
