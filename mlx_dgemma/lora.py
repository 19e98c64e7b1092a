"""LoRA adapters for DiffusionGemma: the attention projections and the dense MLP of each layer.

The router and the routed experts stay frozen (as do norms, embeddings and self-conditioning). An adapter folder
holds `adapters.safetensors` (only the low-rank matrices) and `adapter_config.json`:

    model, tokenizer = mlx_dgemma.load("base_model", adapter_path="adapters")   # applies them
    fuse_model(model)                                                             # folds them into the weights

    python -m mlx_dgemma.fuse --model base_model --adapter-path adapters --save-path fused_model   (or .lora)

Works over float and quantized base weights (QLoRA): the base stays as it is, the adapter is float32.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_KEYS = ATTENTION_KEYS + MLP_KEYS
# Never adapted: routing decisions and the experts are shared by every token and are frozen by design.
FORBIDDEN = ("router", "experts")


class AdapterError(ValueError):
    """An adapter folder cannot be used with this model; the message names the file."""


def _dims(linear) -> tuple[int, int]:
    """(input, output) features of a plain or quantized linear layer."""
    out_features, packed = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        return packed * 32 // linear.bits, out_features
    return packed, out_features


class LoRALinear(nn.Module):
    """`base(x) + scale * dropout(x) @ lora_a @ lora_b`; `lora_b` starts at zero, so a new adapter is a no-op."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        base.freeze()
        self.base = base
        in_features, out_features = _dims(base)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = mx.random.uniform(-bound, bound, (in_features, rank))
        self.lora_b = mx.zeros((rank, out_features))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = self.dropout(x) if self.dropout is not None else x
        delta = (z.astype(self.lora_a.dtype) @ self.lora_a) @ self.lora_b
        return y + (self.scale * delta).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The adapter as a dense `[out, in]` matrix."""
        return (self.scale * (self.lora_a @ self.lora_b)).T

    def fused(self) -> nn.Module:
        """A plain (or, over a quantized base, re-quantized) linear layer equal to this one without dropout."""
        base = self.base
        if isinstance(base, nn.QuantizedLinear):
            mode = getattr(base, "mode", "affine")
            w = mx.dequantize(base.weight, base.scales, base.get("biases"), base.group_size, base.bits, mode=mode)
            w = (w.astype(mx.float32) + self.delta_weight()).astype(w.dtype)
            out_features, in_features = w.shape
            linear = nn.Linear(in_features, out_features, bias="bias" in base)
            linear.weight = w
            if "bias" in base:
                linear.bias = base.bias
            return nn.QuantizedLinear.from_linear(linear, base.group_size, base.bits, mode=mode)
        w = base.weight
        linear = nn.Linear(w.shape[1], w.shape[0], bias="bias" in base)
        linear.weight = (w.astype(mx.float32) + self.delta_weight()).astype(w.dtype)
        if "bias" in base:
            linear.bias = base.bias
        return linear


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        if part not in module:
            return None
        module = module[part]
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module):
    *parents, last = dotted.split(".")
    for part in parents:
        module = module[part]
    setattr(module, last, value)


def check_keys(keys) -> list[str]:
    keys = list(keys)
    bad = [k for k in keys if any(f in k for f in FORBIDDEN)]
    if bad:
        raise ValueError(f"LoRA keys {bad}: the router and the routed experts are frozen in LoRA training")
    unknown = [k for k in keys if k not in DEFAULT_KEYS]
    if unknown:
        raise ValueError(f"unknown LoRA keys {unknown}; choose from {list(DEFAULT_KEYS)}")
    return keys


def layer_indices(n_layers: int, num_layers: int | None) -> list[int]:
    """The last `num_layers` layers (all of them for None or -1)."""
    if num_layers is None or num_layers < 0 or num_layers >= n_layers:
        return list(range(n_layers))
    return list(range(n_layers - num_layers, n_layers))


def apply_lora(
    model,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    keys=DEFAULT_KEYS,
    num_layers: int | None = None,
) -> int:
    """Freeze the model and wrap the chosen linear layers with trainable adapters; returns how many."""
    keys = check_keys(keys)
    model.freeze()
    count = 0
    for i in layer_indices(len(model.layers), num_layers):
        layer = model.layers[i]
        for key in keys:
            target = _get(layer, key)
            if target is None:
                continue  # full-attention layers have no v_proj
            if isinstance(target, LoRALinear):
                raise AdapterError(f"layer {i} {key} already has an adapter")
            if not isinstance(target, (nn.Linear, nn.QuantizedLinear)):
                raise AdapterError(f"layer {i} {key} is a {type(target).__name__}, not a linear layer")
            _set(layer, key, LoRALinear(target, rank=rank, scale=scale, dropout=dropout))
            count += 1
    if count == 0:
        raise AdapterError("no layer matched the LoRA keys")
    return count


def adapter_parameters(model) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def save_adapters(model, folder, config: dict):
    """Write `adapters.safetensors` and `adapter_config.json` (config: rank, scale, dropout, keys, num_layers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_parameters(model)
    if not weights:
        raise AdapterError("the model has no LoRA adapters to save")
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"fine_tune_type": "lora", **config}, indent=2, sort_keys=True))


def read_adapter_config(folder) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if config.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{path}: fine_tune_type {config['fine_tune_type']!r} is not a LoRA adapter")
    return config


def load_adapters(model, folder) -> dict:
    """Apply the adapters saved in `folder` to `model` (in place); returns their configuration."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: not found")
    apply_lora(
        model, rank=config["rank"], scale=config["scale"], dropout=0.0, keys=config.get("keys", DEFAULT_KEYS),
        num_layers=config.get("num_layers"),
    )
    weights = mx.load(str(weights_path))
    expected = adapter_parameters(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise AdapterError(f"{weights_path}: does not match {ADAPTER_CONFIG} and this model ({what})")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise AdapterError(f"{weights_path}: {name} has shape {value.shape}, expected {expected[name].shape}")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    model.eval()
    return config


def fuse_model(model) -> int:
    """Fold every adapter into its base layer (in place); returns how many were fused."""
    count = 0
    for layer in model.layers:
        for key in DEFAULT_KEYS:
            target = _get(layer, key)
            if isinstance(target, LoRALinear):
                _set(layer, key, target.fused())
                count += 1
    return count


if __name__ == "__main__":  # `python -m mlx_dgemma.lora`: the fuse command line, which lives in fuse.py
    from mlx_dgemma.fuse import main

    sys.exit(main())
