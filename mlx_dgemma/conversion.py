"""Convert a Hugging Face DiffusionGemma checkpoint into an mlx-lm-style MLX folder: `convert()` (and `estimate()`,
the sizes from config.json alone). The plan is `conversion_plan.py`; the command line is `convert.py`.

Everything is checked against the configuration before anything is written; the output is built in a hidden
temporary folder beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from .checkpoint import ConversionError, config_path_for, resolve_checkpoint
from .config import ModelArgs, read_json
from .conversion_plan import Plan, bits_per_weight, make_plan, source_dtype
from .model import VISION_PREFIXES
from .quantize import RECIPES, check_settings
from .weights import DTYPE_NAMES, SafetensorsWriter, list_tensors, release_read_buffer

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's 5 GB shards

COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json",
)


# --- writing ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(out: Path, doing: str):
    """A temporary folder beside `out`, renamed to `out` when the block succeeds and removed when it fails or is
    interrupted, so that no half-written output folder is ever left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        if out.exists():
            raise ConversionError(f"{out}: appeared while {doing}; not overwritten")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shard(entries: list, max_bytes: int) -> list[list]:
    """Consecutive groups of at most `max_bytes` (by each item's `nbytes`; a larger item gets a shard alone)."""
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        shards.append(current)
    return shards


def shard_filenames(count: int) -> list[str]:
    """mlx-lm's and transformers' weight file names."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_folder(out: Path, plan: Plan, config: dict, source: Path, max_shard_bytes: int, dtype: mx.Dtype):
    shards = shard(plan.entries, max_shard_bytes)
    names = shard_filenames(len(shards))
    weight_map = {}
    for filename, entries in zip(names, shards):
        planned = [t for e in entries for t in e.outputs()]
        writer = SafetensorsWriter(out / filename, planned, metadata={"format": "mlx"})
        try:
            for e in entries:
                e.write(writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        weight_map.update({t.name: filename for t in planned})
    index = {
        "metadata": {
            "total_size": sum(e.nbytes for e in plan.entries),
            "total_parameters": sum(e.parameters for e in plan.entries),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "quantization", "quantization_config")}
    config["dtype"] = next(k for k, v in DTYPE_NAMES.items() if v == dtype)
    config.pop("torch_dtype", None)
    if plan.quantization:
        config["quantization"] = plan.quantization
        config["quantization_config"] = plan.quantization
    (out / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    (out / "README.md").write_text(
        "---\nlibrary_name: mlx\npipeline_tag: text-generation\ntags:\n- mlx\n- diffusion\n---\n\n"
        f"Converted to MLX with mlx_dgemma from `{source}`.\n\n"
        "```bash\npython -m mlx_dgemma.generate --model PATH_TO_THIS_FOLDER --prompt \"Hello\"\n```\n"
    )


# --- the public entry point ------------------------------------------------------------------------------------


def _check_flags(dtype, quantize, q_bits, q_group_size, q_mode, quant_recipe, dequantize) -> tuple:
    """Every option checked before any file is read; returns (bits, group_size), None unless quantizing."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPE_NAMES)})")
    if quant_recipe not in RECIPES:
        raise ConversionError(f"--quant-recipe {quant_recipe!r} is not supported (choose from {', '.join(RECIPES)})")
    if quantize and dequantize:
        raise ConversionError("--quantize and --dequantize cannot be used together")
    if quantize:
        return check_settings(q_bits, q_group_size, q_mode)
    given = [flag for flag, value in (("--q-bits", q_bits), ("--q-group-size", q_group_size)) if value is not None]
    if q_mode != "affine":
        given.append("--q-mode")
    if given:
        raise ConversionError(f"{', '.join(given)} given without -q/--quantize")
    return None, None


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_recipe: str = "mixed",
    dequantize: bool = False,
    max_shard_size: int = MAX_SHARD_BYTES,
    revision: str | None = None,
    verbose: bool = True,
) -> Path:
    """Convert `hf_path` (a folder or Hub id) into an MLX folder at `mlx_path`; returns the folder."""
    say = print if verbose else (lambda *a, **k: None)
    out = Path(mlx_path).expanduser()
    bits, group_size = _check_flags(dtype, quantize, q_bits, q_group_size, q_mode, quant_recipe, dequantize)
    if out.exists():
        raise ConversionError(f"{out}: already exists; choose another --mlx-path or delete it")

    say(f"[INFO] Loading {hf_path}")
    source = resolve_checkpoint(hf_path, revision)
    config = read_json(source / "config.json")
    args = ModelArgs.from_dict(config, source=str(source / "config.json"))
    tensors = list_tensors(source)
    target = DTYPE_NAMES[dtype] if dtype else source_dtype(config, tensors)
    plan = make_plan(
        args, config, tensors, dtype=target, quantize=quantize, bits=bits, group_size=group_size, mode=q_mode,
        recipe=quant_recipe, dequantize=dequantize, folder=source,
    )
    say(f"[INFO] Using dtype: {next(k for k, v in DTYPE_NAMES.items() if v == target)}")
    if quantize:
        say(f"[INFO] Quantizing ({quant_recipe} recipe, {bits} bits, group size {group_size}, {q_mode})")

    start = time.perf_counter()
    try:
        with staged_folder(out, "converting") as tmp:
            write_folder(tmp, plan, config, source, max_shard_size, target)
    finally:
        release_read_buffer()
    seconds = time.perf_counter() - start
    total = sum(e.nbytes for e in plan.entries)
    if quantize:
        say(f"[INFO] Quantized model with {bits_per_weight(plan):.3f} bits per weight.")
    say(f"[INFO] Wrote {total / 1e9:.2f} GB to {out} in {seconds:.1f} s ({total / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return out


COMPONENTS = [  # (label, test on our tensor name), first match wins
    ("vision", lambda n: n.startswith(VISION_PREFIXES)),
    ("embeddings (and tied LM head)", lambda n: n.startswith("embed_tokens.")),
    ("self-conditioning", lambda n: n.startswith("self_conditioning.") and not n.endswith("norm.weight")),
    ("experts", lambda n: ".experts." in n),
    ("router", lambda n: ".router." in n),
    ("attention", lambda n: ".self_attn." in n and "_proj." in n),
    ("dense MLP", lambda n: ".mlp." in n),
    ("norms and scalars", lambda n: True),
]


def estimate(
    hf_path: str, *, dtype: str | None = None, quantize: bool = False, q_bits: int | None = None,
    q_group_size: int | None = None, q_mode: str = "affine", quant_recipe: str = "mixed", dequantize: bool = False,
    revision: str | None = None,
) -> tuple[list[tuple[str, int, int]], Plan]:
    """Output size per component from `config.json` alone: [(component, bytes, parameters)], plan."""
    bits, group_size = _check_flags(dtype, quantize, q_bits, q_group_size, q_mode, quant_recipe, dequantize)
    config_path = config_path_for(hf_path, revision)
    config = read_json(config_path)
    args = ModelArgs.from_dict(config, source=str(config_path))
    target = DTYPE_NAMES[dtype] if dtype else source_dtype(config, None)
    plan = make_plan(
        args, config, None, dtype=target, quantize=quantize, bits=bits, group_size=group_size, mode=q_mode,
        recipe=quant_recipe, dequantize=dequantize, folder=config_path.parent,
    )
    sizes = {label: [0, 0] for label, _ in COMPONENTS}
    for e in plan.entries:
        label = next(label for label, test in COMPONENTS if test(e.name))
        sizes[label][0] += e.nbytes
        sizes[label][1] += e.parameters
    return [(label, b, p) for label, (b, p) in sizes.items() if p], plan

