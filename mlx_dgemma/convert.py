"""Convert a Hugging Face DiffusionGemma checkpoint into an mlx-lm-style MLX folder.

    python -m mlx_dgemma.convert --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q

Streams tensor by tensor (in row ranges), so memory stays near one slice of one tensor whatever the model size.
Everything is checked against the configuration before anything is written; the output is built in a hidden
temporary folder beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError, ModelArgs, read_json
from .model import VISION_PREFIXES, Model, checkpoint_name
from .quantize import (
    RECIPES,
    QuantSpec,
    check_settings,
    config_block,
    is_quantizable,
    module_path,
    recorded_spec,
    spec_for,
)
from .weights import (
    DTYPE_NAMES,
    CheckpointError,
    PlannedTensor,
    SafetensorsWriter,
    TensorSource,
    list_tensors,
    release_read_buffer,
)

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's 5 GB shards
CHUNK_ELEMENTS = 1 << 24  # rows are converted in slices of about this many elements


def row_ranges(shape) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about CHUNK_ELEMENTS elements each; a scalar is one row."""
    rows = shape[0] if shape else 1
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


class ConversionError(ValueError):
    pass


def resolve_checkpoint(path_or_repo: str, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id fetched with huggingface-hub (the weights, configs and tokenizer)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: expected a model folder, found a file")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise ConversionError(f"{path_or_repo}: no such folder (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model...
        raise ConversionError(f"{path_or_repo}: not a local folder and could not be downloaded ({type(e).__name__}: {e})") from None


# --- planning --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tensor of ours, from one source tensor (or, for an MLX quantized source, a packed triple)."""

    name: str
    shape: tuple  # logical shape
    source: TensorSource | None = None
    dtype: mx.Dtype = mx.float32  # output dtype of float tensors
    quant: QuantSpec | None = None  # output quantization
    source_quant: QuantSpec | None = None  # the source is packed this way
    packed: dict = field(default_factory=dict)  # source quantized parts: "weight"/"scales"/"biases"

    @property
    def is_float(self) -> bool:
        if self.source is None:
            return True
        return self.source_quant is not None or self.source.dtype in ("F32", "F16", "BF16", "F64")

    def outputs(self) -> list[PlannedTensor]:
        if self.quant is not None:
            module = self.name[: -len(".weight")]
            scale_dtype = self.dtype if self.quant.mode == "affine" else mx.uint8
            out = [
                PlannedTensor(f"{module}.weight", mx.uint32, self.quant.packed_shape(self.shape)),
                PlannedTensor(f"{module}.scales", scale_dtype, self.quant.scales_shape(self.shape)),
            ]
            if self.quant.has_biases:
                out.append(PlannedTensor(f"{module}.biases", scale_dtype, self.quant.scales_shape(self.shape)))
            return out
        dtype = self.dtype if self.is_float else _source_mx_dtype(self.source)
        return [PlannedTensor(self.name, dtype, self.shape)]

    @property
    def parameters(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs())

    def read(self, start: int, stop: int) -> mx.array:
        if self.source_quant is None:
            return self.source.read(start, stop)
        q = self.source_quant
        parts = [self.packed[k].read(start, stop) for k in ("weight", "scales", "biases") if k in self.packed]
        return mx.dequantize(*parts[:2], parts[2] if len(parts) > 2 else None, group_size=q.group_size, bits=q.bits, mode=q.mode)

    def write(self, writer: SafetensorsWriter):
        outputs = self.outputs()
        names = [t.name for t in outputs]
        if self.source_quant is not None and self.quant == self.source_quant:
            # Kept at the source's settings: the packed parts are copied, never re-quantized (which would not be
            # lossless); only float scales and biases follow the output dtype.
            for start, stop in row_ranges(self.shape):
                for t, key in zip(outputs, ("weight", "scales", "biases")):
                    part = self.packed[key].read(start, stop)
                    writer.write(t.name, part if part.dtype == t.dtype else part.astype(t.dtype))
            return
        for start, stop in row_ranges(self.shape):
            x = self.read(start, stop)
            if self.is_float:
                x = x.astype(self.dtype)
            parts = mx.quantize(x, self.quant.group_size, self.quant.bits, mode=self.quant.mode) if self.quant else (x,)
            mx.eval(parts)
            for name, part in zip(names, parts):
                writer.write(name, part)
            del x, parts


def _source_mx_dtype(source: TensorSource) -> mx.Dtype:
    from .weights import ST_TO_MX

    return ST_TO_MX[source.dtype]


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Every tensor the text model needs, with its shape (the model is built lazily: nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def vision_shapes(vision: dict | None, hidden_size: int) -> dict[str, tuple]:
    """Shapes of the vision tower the converter carries along, from `vision_config` (for size estimates)."""
    if not vision:
        return {}
    hv, inter, heads = vision["hidden_size"], vision["intermediate_size"], vision["num_attention_heads"]
    kv, hd = vision.get("num_key_value_heads", heads), vision.get("head_dim", hv // heads)
    p, pos = vision.get("patch_size", 16), vision.get("position_embedding_size", 10240)
    shapes = {
        "vision_tower.patch_embedder.input_proj.weight": (hv, 3 * p * p),
        "vision_tower.patch_embedder.position_embedding_table": (2, pos, hv),
        "embed_vision.embedding_projection.weight": (hidden_size, hv),
    }
    if vision.get("standardize"):
        shapes["vision_tower.std_bias"] = (hv,)
        shapes["vision_tower.std_scale"] = (hv,)
    linears = {"self_attn.q_proj": (heads * hd, hv), "self_attn.k_proj": (kv * hd, hv), "self_attn.v_proj": (kv * hd, hv),
               "self_attn.o_proj": (hv, heads * hd), "mlp.gate_proj": (inter, hv), "mlp.up_proj": (inter, hv),
               "mlp.down_proj": (hv, inter)}
    for i in range(vision["num_hidden_layers"]):
        pre = f"vision_tower.encoder.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[f"{pre}{norm}.weight"] = (hv,)
        shapes[f"{pre}self_attn.q_norm.weight"] = (hd,)
        shapes[f"{pre}self_attn.k_norm.weight"] = (hd,)
        for name, shape in linears.items():
            shapes[f"{pre}{name}.linear.weight"] = shape
            if vision.get("use_clipped_linears"):
                for b in ("input_min", "input_max", "output_min", "output_max"):
                    shapes[f"{pre}{name}.{b}"] = ()
    return shapes


@dataclass
class Plan:
    entries: list[Entry]
    quantization: dict | None  # the config.json block, None when not quantized


def source_dtype(config: dict, tensors: list[TensorSource] | None) -> mx.Dtype:
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    for t in tensors or []:
        if t.dtype in ("BF16", "F16", "F32"):
            return {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[t.dtype]
    return mx.bfloat16


def make_plan(
    args: ModelArgs,
    config: dict,
    tensors: list[TensorSource] | None,
    *,
    dtype: mx.Dtype,
    quantize: bool,
    bits: int,
    group_size: int,
    mode: str,
    recipe: str,
    dequantize: bool,
    folder: Path | None = None,
) -> Plan:
    """Map, check and plan every output tensor. With `tensors=None` the plan comes from the config alone."""
    expected = expected_shapes(args)
    source_q = config.get("quantization")
    if source_q and quantize:
        raise ConversionError(f"{folder}: the checkpoint is already quantized; convert with --dequantize first")
    if dequantize and not source_q:
        raise ConversionError(f"{folder}: --dequantize needs a quantized MLX folder (its config.json has no 'quantization')")
    if tensors is None:
        shapes = {**expected, **vision_shapes(config.get("vision_config"), args.hidden_size)}
        entries = [Entry(n, s) for n, s in shapes.items()]
        if source_q:  # sized from the config: the converter quantizes every quantizable tensor
            for e in entries:
                if is_quantizable(e.name):
                    e.source_quant = recorded_spec(source_q, module_path(e.name))
    else:
        entries = _entries_from_sources(tensors, source_q, expected, folder)
    specs = {}
    for e in entries:
        if e.is_float:
            e.dtype = dtype
        if e.source_quant is not None and not dequantize:
            e.quant = e.source_quant  # re-packed with the same settings: lossless
        if quantize and is_quantizable(e.name):
            spec = spec_for(e.name, bits, group_size, mode, recipe)
            if e.shape[-1] % spec.group_size:
                raise ConversionError(
                    f"--q-group-size {spec.group_size} does not divide the last dimension of {e.name} {e.shape}"
                )
            e.quant = spec
        if e.quant is not None:
            specs[e.name] = e.quant
    block = None
    if quantize:
        block = config_block(specs, QuantSpec(bits, group_size, mode))
    elif source_q and not dequantize:
        block = source_q
    return Plan(sorted(entries, key=lambda e: e.name), block)


def _entries_from_sources(tensors, source_q, expected, folder) -> list[Entry]:
    by_name, origin = {}, {}
    for t in tensors:
        try:
            ours = checkpoint_name(t.name)
        except KeyError:
            raise CheckpointError(f"{t.file}: unexpected tensor {t.name!r}") from None
        if ours is None:
            continue  # a tied copy or a recomputed buffer
        if ours in by_name:
            raise CheckpointError(f"{t.file}: tensor {t.name!r} duplicates {origin[ours]!r}")
        by_name[ours], origin[ours] = t, t.name

    entries = []
    if source_q:  # an MLX quantized folder: fold weight/scales/biases back into one logical tensor
        for name in [n for n in by_name if n.endswith(".scales")]:
            module = name[: -len(".scales")]
            spec = recorded_spec(source_q, module)
            packed = {k: by_name.pop(f"{module}.{k}") for k in ("weight", "scales", "biases") if f"{module}.{k}" in by_name}
            w = packed["weight"]
            shape = (*w.shape[:-1], w.shape[-1] * 32 // spec.bits)
            entries.append(Entry(f"{module}.weight", shape, w, source_quant=spec, packed=packed))
    entries += [Entry(n, t.shape, t) for n, t in by_name.items()]

    have = {e.name: e for e in entries}
    missing = [n for n in expected if n not in have]
    if missing:
        raise CheckpointError(
            f"{folder}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    for e in entries:
        where = e.source.file if e.source is not None else folder
        if e.name.startswith(VISION_PREFIXES):
            continue
        if e.name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {origin.get(e.name, e.name)!r}")
        if tuple(e.shape) != expected[e.name]:
            raise CheckpointError(
                f"{where}: tensor {origin.get(e.name, e.name)!r} has shape {tuple(e.shape)}, expected {expected[e.name]}"
            )
    return entries


# --- writing ---------------------------------------------------------------------------------------------------


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


def bits_per_weight(plan: Plan) -> float:
    params = sum(e.parameters for e in plan.entries)
    return 8 * sum(e.nbytes for e in plan.entries) / max(params, 1)


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


def config_path_for(hf_path: str, revision: str | None = None) -> Path:
    """`config.json` of a local folder (or the file itself), or of a Hub repo: that one file is downloaded."""
    path = Path(hf_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    if path.exists() or hf_path.count("/") != 1 or hf_path.startswith((".", "/", "~")):
        raise ConversionError(f"{hf_path}: no config.json there (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hf_path, "config.json", revision=revision))
    except Exception as e:  # offline, unknown repo, gated model...
        raise ConversionError(f"{hf_path}: no local folder and config.json could not be downloaded ({type(e).__name__}: {e})") from None


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


# --- command line ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.convert",
        description="Convert a Hugging Face DiffusionGemma checkpoint to MLX format (optionally quantized).",
    )
    p.add_argument("--hf-path", "--model", dest="hf_path", required=True, help="Local folder or Hugging Face repo id.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (must not exist). Default: mlx_model")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="Float dtype of the weights. Default: the checkpoint's.")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    p.add_argument("--q-bits", type=int, help="Bits per weight for quantization (4 or 8). Default: 4.")
    p.add_argument("--q-group-size", type=int, help="Group size for quantization (32, 64, 128). Default: 64.")
    p.add_argument("--q-mode", default="affine", help="Quantization mode: affine, mxfp4, mxfp8. Default: affine.")
    p.add_argument("--quant-recipe", default="mixed", choices=RECIPES,
                   help="mixed: only the experts at --q-bits, everything else 8-bit (default); uniform: all at --q-bits.")
    p.add_argument("-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX folder.")
    p.add_argument("--dry-run", action="store_true", help="Read only config.json and print the output size per component.")
    p.add_argument("--max-shard-size", type=parse_size, default=MAX_SHARD_BYTES, help="Largest weight file. Default: 5GB.")
    p.add_argument("--revision", help="Hub revision to download.")
    p.add_argument("--to-hf", action="store_true",
                   help="The other way: export the MLX folder --mlx-path to a Hugging Face folder --hf-path "
                        "(dequantized; loads with transformers' from_pretrained).")
    p.add_argument("--adapter-path", help="With --to-hf: fuse these LoRA adapters into the exported weights.")
    return p


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    # A terminated conversion must still clean up its temporary folder.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.to_hf:
            from .export import export_hf

            export_hf(args.mlx_path, args.hf_path, adapter_path=args.adapter_path, dtype=args.dtype,
                      max_shard_size=args.max_shard_size)
            return 0
        if args.dry_run:
            rows, plan = estimate(
                args.hf_path, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size, q_mode=args.q_mode, quant_recipe=args.quant_recipe,
                dequantize=args.dequantize, revision=args.revision,
            )
            width = max(len(r[0]) for r in rows)
            for label, nbytes, params in rows:
                print(f"{label:<{width}}  {nbytes / 1e9:8.3f} GB  {params / 1e9:7.3f} B params  {8 * nbytes / params:6.2f} bits/weight")
            total = sum(r[1] for r in rows)
            print(f"Total: {total / 1e9:.2f} GB ({bits_per_weight(plan):.2f} bits per weight)")
            return 0
        convert(
            args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
            q_group_size=args.q_group_size, q_mode=args.q_mode, quant_recipe=args.quant_recipe,
            dequantize=args.dequantize, max_shard_size=args.max_shard_size, revision=args.revision,
        )
        return 0
    except (ConversionError, ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


class _CallableModule(types.ModuleType):
    """`mlx_dgemma.convert` is this module (for `python -m`) and also works as the `convert` function."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
