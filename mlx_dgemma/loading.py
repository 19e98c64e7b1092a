"""`load()`: a converted MLX folder, an original Hugging Face folder (converted in memory) or a Hub id."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from . import backend
from .config import ModelArgs, SamplerConfig, read_json
from .checkpoint import resolve_checkpoint
from .conversion_plan import make_plan, source_dtype
from .cpu import keep_buffers
from .model import VISION_PREFIXES, Model, checkpoint_name
from .switch import widen_cpu_experts
from .quantize import apply_to_model
from .vision import load_vision
from .weights import list_tensors


def load_weights(folder: Path, config: dict, args: ModelArgs) -> dict[str, mx.array]:
    """Our-named weights of a folder, checked against the model's shapes. Safetensors load lazily."""
    tensors = list_tensors(folder)
    # The converter's planning is the one place names and shapes are checked; it raises naming file and key.
    make_plan(
        args, config, tensors, dtype=source_dtype(config, tensors), quantize=False, bits=None, group_size=None,
        mode="affine", recipe="mixed", dequantize=False, folder=folder,
    )
    weights = {}
    for path in sorted({t.file for t in tensors}):
        if path.suffix == ".safetensors":
            weights.update({checkpoint_name(k): v for k, v in mx.load(str(path)).items() if checkpoint_name(k)})
    for t in tensors:
        if t.file.suffix != ".safetensors" and checkpoint_name(t.name):
            weights[checkpoint_name(t.name)] = t.read()
    return {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)}


def load_model(folder: Path, lazy: bool = False) -> Model:
    backend.current()  # the device profile is picked here, once (see backend.py)
    keep_buffers()
    folder = Path(folder)
    config = read_json(folder / "config.json")
    args = ModelArgs.from_dict(config, source=str(folder / "config.json"))
    model = Model(args)
    weights = load_weights(folder, config, args)
    if config.get("quantization"):
        apply_to_model(model, config["quantization"], weights)
    model.load_weights(list(weights.items()), strict=True)
    if backend.on_cpu():
        widen_cpu_experts(model)
    model.sampler_defaults = SamplerConfig.from_folder(folder, args)
    model.vision = load_vision(folder, config, args.hidden_size)  # None for a text-only folder
    model.eval()
    if not lazy:
        mx.eval(model.state)  # parameters and the private RoPE tables, so any thread can use the model
        if model.vision is not None:
            mx.eval(model.vision.model.state)
    return model


def load(path_or_repo: str, *, adapter_path: str | None = None, lazy: bool = False, revision: str | None = None):
    """`(model, tokenizer)`; `tokenizer` is None when the folder has no tokenizer files."""
    from .tokenizer import load_tokenizer

    folder = resolve_checkpoint(str(path_or_repo), revision)
    model = load_model(folder, lazy=lazy)
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    return model, load_tokenizer(folder)
