"""Export an MLX DiffusionGemma folder back to Hugging Face format, for transformers' `from_pretrained`.

    python -m mlx_dgemma.convert --to-hf --mlx-path trained_model --hf-path trained_model_hf
    python -m mlx_dgemma.convert --to-hf --mlx-path base --adapter-path adapters --hf-path fused_hf   # LoRA fused

Quantized weights are dequantized (the reference has no MLX quantization). Tensors get the names
`save_pretrained` writes (the decoder's names for every shared weight, the encoder's own `layer_scalar`s), and
without adapters the export streams tensor by tensor, so memory stays near one slice of one tensor.

DiffusionGemma always builds a vision tower. A text-only folder (the demo model, or a model trained from scratch
here) has no vision weights: the export then writes a placeholder tower (zeros, norms at one) so the reference
loads without initialising anything at random; it is never used for text.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import ConversionError, resolve_checkpoint
from .config import OUR_GENERATION_KEY, ModelArgs, read_json
from .conversion import COPIED_FILES, MAX_SHARD_BYTES, shard, shard_filenames, staged_folder
from .conversion_plan import make_plan, row_ranges, source_dtype, vision_shapes
from .model import VISION_PREFIXES, checkpoint_name
from .weights import DTYPE_NAMES, PlannedTensor, SafetensorsWriter, list_tensors

# A minimal vision tower for text-only folders whose config.json has no vision_config (the reference would
# otherwise build its 27-layer default).
PLACEHOLDER_VISION = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "pooling_kernel_size": 2,
    "position_embedding_size": 16, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"}, "standardize": False, "use_clipped_linears": False,
}


def hf_name(ours: str) -> str:
    """The Hugging Face checkpoint name of one of our tensors (the inverse of `model.checkpoint_name`)."""
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", ours)
    if m:
        name = f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    elif re.fullmatch(r"layers\.\d+\.experts\.(gate_up_proj|down_proj)\.weight", ours):
        name = "model.decoder." + ours[: -len(".weight")]
    elif ours.startswith(VISION_PREFIXES):
        name = "model.encoder." + ours
    else:
        name = "model.decoder." + ours
    if checkpoint_name(name) != ours:  # one name table: the mapping must round-trip through it
        raise ConversionError(f"no Hugging Face name for tensor {ours!r}")
    return name


class _Item:
    """One output tensor: its name, shape, dtype and a reader of row ranges."""

    def __init__(self, name, shape, dtype, read):
        self.name, self.shape, self.dtype, self.read = name, tuple(shape), dtype, read

    @property
    def nbytes(self) -> int:
        return PlannedTensor(self.name, self.dtype, self.shape).nbytes


def _from_folder(folder: Path, config: dict, args: ModelArgs, dtype) -> list[_Item]:
    """Streamed, dequantized tensors of an MLX (or Hugging Face) folder, under their Hugging Face names."""
    tensors = list_tensors(folder)
    plan = make_plan(
        args, config, tensors, dtype=dtype, quantize=False, bits=None, group_size=None, mode="affine",
        recipe="mixed", dequantize=bool(config.get("quantization")), folder=folder,
    )
    items = []
    for e in plan.entries:
        if not e.is_float:
            raise ConversionError(f"{folder}: tensor {e.name!r} is not floating point")
        items.append(_Item(hf_name(e.name), e.shape, dtype, lambda a, b, e=e: e.read(a, b)))
    return items


def _from_model(model, folder: Path, dtype) -> list[_Item]:
    """Tensors of an in-memory model (after fusing adapters), dequantized, plus the folder's vision tensors."""
    weights = {}
    quantized = set()
    for name, module in model.named_modules():
        if "scales" in module and name:
            mode = getattr(module, "mode", "affine")
            w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                              mode=mode)
            weights[f"{name}.weight"] = w
            quantized.update({f"{name}.{k}" for k in ("weight", "scales", "biases")})
    for name, value in tree_flatten(model.parameters()):
        if name not in quantized:
            weights[name] = value
    items = [_Item(hf_name(k), v.shape, dtype, lambda a, b, v=v: v[a:b]) for k, v in sorted(weights.items())]
    for t in list_tensors(folder):
        ours = checkpoint_name(t.name)
        if ours is not None and ours.startswith(VISION_PREFIXES):
            items.append(_Item(hf_name(ours), t.shape, dtype, lambda a, b, t=t: t.read(a, b)))
    return items


def _placeholder_vision(vision: dict, hidden_size: int, dtype) -> list[_Item]:
    items = []
    for ours, shape in vision_shapes(vision, hidden_size).items():
        one = ours.endswith(("norm.weight", "std_scale")) or "position_embedding_table" in ours
        fill = 1.0 if one else 0.0
        items.append(_Item(hf_name(ours), shape, dtype,
                            lambda a, b, shape=shape, fill=fill: mx.full((b - a, *shape[1:]), fill, dtype=dtype)))
    return items


def _write(out: Path, items: list[_Item], max_shard_bytes: int):
    shards = shard(items, max_shard_bytes)
    names = shard_filenames(len(shards))
    weight_map = {}
    for filename, group in zip(names, shards):
        writer = SafetensorsWriter(out / filename, [PlannedTensor(i.name, i.dtype, i.shape) for i in group],
                                   metadata={"format": "pt"})
        try:
            for item in group:
                for start, stop in row_ranges(item.shape):
                    part = item.read(start, stop).astype(item.dtype)
                    mx.eval(part)
                    writer.write(item.name, part)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        weight_map.update({i.name: filename for i in group})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in items)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf(
    mlx_path,
    hf_path,
    *,
    adapter_path=None,
    dtype: str | None = None,
    max_shard_size: int = MAX_SHARD_BYTES,
    verbose: bool = True,
) -> Path:
    """Write a Hugging Face DiffusionGemma folder at `hf_path` from the MLX folder `mlx_path`; returns it."""
    say = print if verbose else (lambda *a, **k: None)
    out = Path(hf_path).expanduser()
    if out.exists():
        raise ConversionError(f"{out}: already exists; choose another --hf-path or delete it")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPE_NAMES)})")
    source = resolve_checkpoint(str(mlx_path))
    config = read_json(source / "config.json")
    args = ModelArgs.from_dict(config, source=str(source / "config.json"))
    quantization = config.get("quantization")
    if dtype is not None:
        target = DTYPE_NAMES[dtype]
    elif quantization:
        target = mx.bfloat16 if config.get("dtype") in (None, "bfloat16") else DTYPE_NAMES.get(config["dtype"], mx.bfloat16)
    else:
        target = source_dtype(config, list_tensors(source))
    target_name = next(k for k, v in DTYPE_NAMES.items() if v == target)

    if adapter_path is not None:
        from .loading import load_model
        from .lora import fuse_model, load_adapters

        model = load_model(source)
        load_adapters(model, adapter_path)
        n = fuse_model(model)
        say(f"[INFO] Fused {n} LoRA adapters from {adapter_path}")
        items = _from_model(model, source, target)
    else:
        items = _from_folder(source, config, args, target)

    hf_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = target_name
    hf_config["model_type"] = "diffusion_gemma"
    hf_config.setdefault("architectures", ["DiffusionGemmaForBlockDiffusion"])
    if config.get("model_type") != "diffusion_gemma":
        raise ConversionError(f"{source}: config.json model_type {config.get('model_type')!r}; expected 'diffusion_gemma'")
    if not any(i.name.startswith("model.encoder.vision_tower.") for i in items):
        vision = hf_config.setdefault("vision_config", dict(PLACEHOLDER_VISION))
        items += _placeholder_vision(vision, args.hidden_size, target)
        say("[INFO] No vision weights in the source: wrote a placeholder vision tower (zeros; text-only model)")

    with staged_folder(out, "exporting") as tmp:
        _write(tmp, items, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        _drop_our_generation_settings(tmp / "generation_config.json")
    total = sum(i.nbytes for i in items)
    say(f"[INFO] Wrote a Hugging Face folder ({target_name}, {total / 1e6:.1f} MB) to {out}")
    return out


def _drop_our_generation_settings(path: Path):
    """transformers' DiffusionGemmaGenerationConfig rejects keys it does not know: our sampler choice stays out."""
    if path.is_file():
        gen = json.loads(path.read_text())
        if gen.pop(OUR_GENERATION_KEY, None) is not None:
            path.write_text(json.dumps(gen, indent=2, sort_keys=True))
