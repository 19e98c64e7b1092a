"""Which tensors are quantized, how, and how a quantized folder is loaded back.

The default 4-bit recipe follows what the other MLX ports learned: 4-bit embeddings and attention cost most of
the quality, so only the routed experts go to 4 bits; the embedding (also the LM head and the self-conditioning
soft embedding), attention, router, dense MLP and self-conditioning stay at 8 bits. Fused expert tensors
`[E, out, in]` are quantized per expert row, never across experts.

Settings are recorded in `config.json` the way mlx-lm records them: global `group_size`/`bits`/`mode`, plus one
entry per module whose settings differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import QUANT_RECIPES

MODES = {  # mode -> (allowed bits, allowed group sizes, default group size)
    "affine": ((4, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "mxfp8": ((8,), (32,), 32),
}
RECIPES = QUANT_RECIPES


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def packed_shape(self, shape: tuple) -> tuple:
        return (*shape[:-1], shape[-1] * self.bits // 32)

    def scales_shape(self, shape: tuple) -> tuple:
        return (*shape[:-1], shape[-1] // self.group_size)

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"


def check_settings(bits: int | None, group_size: int | None, mode: str) -> tuple[int, int]:
    """Validate quantization flags before any work; returns (bits, group_size) with defaults filled in."""
    if mode not in MODES:
        raise ValueError(f"--q-mode {mode!r} is not supported (choose from {', '.join(MODES)})")
    allowed_bits, allowed_groups, default_group = MODES[mode]
    bits = allowed_bits[0] if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if bits not in allowed_bits:
        raise ValueError(f"--q-bits {bits} is not supported for mode {mode!r} (choose from {list(allowed_bits)})")
    if group_size not in allowed_groups:
        raise ValueError(
            f"--q-group-size {group_size} is not supported for mode {mode!r} (choose from {list(allowed_groups)})"
        )
    return bits, group_size


def is_quantizable(name: str) -> bool:
    """Matrices of the text stack: linear projections, experts, the embedding. Never norms, scales or vision."""
    if name.startswith(("vision_tower.", "embed_vision.")):
        return False
    return name.endswith(("_proj.weight", "router.proj.weight")) or name == "embed_tokens.weight"


def spec_for(name: str, bits: int, group_size: int, mode: str, recipe: str) -> QuantSpec:
    """The quantization of one quantizable tensor under a recipe."""
    if recipe == "mixed" and bits < 8 and ".experts." not in name:
        return QuantSpec(8, group_size, "affine") if mode == "affine" else QuantSpec(8, 32, "mxfp8")
    return QuantSpec(bits, group_size, mode)


def module_path(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def recorded_spec(quantization: dict, module: str) -> QuantSpec:
    """The settings a `quantization` block records for one module (its override, else the global ones)."""
    override = quantization.get(module)
    settings = {"mode": "affine", **{k: quantization[k] for k in ("bits", "group_size", "mode") if k in quantization}}
    if isinstance(override, dict):
        settings.update({k: override[k] for k in ("bits", "group_size", "mode") if k in override})
    return QuantSpec(**settings)


def config_block(specs: dict[str, QuantSpec], default: QuantSpec) -> dict:
    """mlx-lm's `quantization` block: the global settings plus an entry for every module that differs."""
    block = default.as_dict()
    for name, spec in sorted(specs.items()):
        if spec != default:
            block[module_path(name)] = spec.as_dict()
    return block


def apply_to_model(model: nn.Module, quantization: dict, weights: dict):
    """Swap in quantized layers where the weights carry scales, with each module's recorded settings."""
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    default.setdefault("mode", "affine")

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {"mode": "affine", **override}
        return True

    nn.quantize(model, group_size=default["group_size"], bits=default["bits"], mode=default["mode"], class_predicate=predicate)
