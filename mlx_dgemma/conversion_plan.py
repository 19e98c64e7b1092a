"""The converter's plan: every output tensor mapped, checked against the configuration and sized before anything
is written (`make_plan`); `conversion.py` writes it.

An `Entry` is one tensor of ours from one source tensor (or a packed quantized triple), read in row ranges of
about CHUNK_ELEMENTS elements, so memory stays near one slice of one tensor whatever the model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import ConversionError
from .config import ModelArgs
from .model import VISION_PREFIXES, Model, checkpoint_name
from .quantize import QuantSpec, config_block, is_quantizable, module_path, recorded_spec, spec_for
from .weights import DTYPE_NAMES, CheckpointError, PlannedTensor, SafetensorsWriter, TensorSource

CHUNK_ELEMENTS = 1 << 24  # rows are converted in slices of about this many elements


def row_ranges(shape) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about CHUNK_ELEMENTS elements each; a scalar is one row."""
    rows = shape[0] if shape else 1
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


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


def bits_per_weight(plan: Plan) -> float:
    params = sum(e.parameters for e in plan.entries)
    return 8 * sum(e.nbytes for e in plan.entries) / max(params, 1)

