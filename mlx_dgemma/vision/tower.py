"""The Gemma 4 vision tower and the `embed_vision` projector: image patches -> soft tokens in the text's space.

DiffusionGemma reuses Gemma 4's tower unchanged (transformers 5.24.0 `Gemma4VisionModel`): a linear patch embedding
plus a learned (x, y) position table, encoder layers with sandwich norms, 2-D RoPE and unscaled bidirectional
attention, then position-wise k x k average pooling, a sqrt(hidden) scale and (in the release) a standardisation,
these last steps in float32 because the features reach ~5e4 before `std_bias` cancels them. The projector
(`DiffusionGemmaMultimodalEmbedder`) is a weightless RMSNorm and one linear map to the text width.

Names follow the checkpoint (`vision_tower.*`, `embed_vision.*`) so converted weights load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import backend, cpu
from ..config import ConfigError

# Queries per attention call on the CPU: its attention materialises [heads, queries, keys] float32 scores, which
# for a 1120-token image (10 080 patches) would be 6.5 GB at once; 1024 queries keep it near 0.65 GB, and the
# chunks run on the CPU lanes (the softmax of one op runs on one thread).
ATTENTION_QUERY_CHUNK = 1024
# Head dims Metal's fused attention kernel takes; the release's 72 is padded with zeros to 80 for it (exact: the
# scale is given explicitly, zero channels add nothing to q.k, and the zero value channels are cut off).
FUSED_HEAD_DIMS = (64, 80, 128)


@dataclass
class VisionArgs:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10_240
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    hidden_activation: str = "gelu_pytorch_tanh"
    standardize: bool = False
    use_clipped_linears: bool = False

    @classmethod
    def from_dict(cls, vision: dict, source: str = "config.json") -> "VisionArgs":
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in vision.items() if k in names and v is not None})
        rope = args.rope_parameters or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{source}: vision_config.rope_parameters.rope_type {rope.get('rope_type')!r} is not supported (expected 'axial')")
        if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{source}: vision_config.hidden_activation {args.hidden_activation!r} is not supported")
        if args.head_dim % 4:
            raise ConfigError(f"{source}: vision_config.head_dim {args.head_dim} must be a multiple of 4 (2-D RoPE)")
        return args


def rms_norm_f32(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm computed in float32 (weight applied there too) and cast back, as `Gemma4RMSNorm` does."""
    w = None if weight is None else weight.astype(mx.float32)
    return mx.fast.rms_norm(x.astype(mx.float32), w, eps).astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm_f32(x, self.weight, self.eps)


class ClippableLinear(nn.Module):
    """`Gemma4ClippableLinear`: a bias-free linear map under `.linear`, optionally clamping input and output to
    recorded ranges (the release has no clipping; the buffers exist only when `use_clipped_linears`)."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        if clipped:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)

    def __call__(self, x):
        if "input_min" in self:
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        if "output_min" in self:
            y = mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))
        return y


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """2-D RoPE on `x` `[B, P, heads, d]`: the first d/2 channels rotate by the patch's x, the rest by its y, each
    half rotate-half style (pairs i, i + d/4). `cos`/`sin` are `[B, P, 2, d/4]` (x angles, y angles)."""
    B, P, H, d = x.shape
    parts = x.reshape(B, P, H, 2, 2, d // 4)  # [.., axis, half-of-axis, freq]
    x1, x2 = parts[..., 0, :], parts[..., 1, :]
    c, s = cos[:, :, None], sin[:, :, None]  # [B, P, 1, 2, d/4]
    out = mx.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
    return out.reshape(B, P, H, d)


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        clip = args.use_clipped_linears
        self.q_proj = ClippableLinear(h, self.n_heads * d, clip)
        self.k_proj = ClippableLinear(h, self.n_kv_heads * d, clip)
        self.v_proj = ClippableLinear(h, self.n_kv_heads * d, clip)
        self.o_proj = ClippableLinear(self.n_heads * d, h, clip)
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.eps = args.rms_norm_eps

    def __call__(self, x, cos, sin, mask):
        B, P, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, P, self.n_heads, -1)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, P, self.n_kv_heads, -1)), cos, sin)
        v = rms_norm_f32(self.v_proj(x).reshape(B, P, self.n_kv_heads, -1), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, P, -1))


def attend(q, k, v, mask):
    """Bidirectional attention with scale 1.0 (q and k are RMS-normalised instead); only padding keys are masked."""
    if backend.current().lanes:
        P, group = q.shape[2], ATTENTION_QUERY_CHUNK * len(cpu.lanes())
        outs = []
        for start in range(0, P, group):
            block = q[:, :, start : start + group]
            parts = cpu.map_positions(
                block.shape[2], lambda rows: mx.fast.scaled_dot_product_attention(block[:, :, rows], k, v, scale=1.0, mask=mask),
                chunk=ATTENTION_QUERY_CHUNK,
            )
            outs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
            if P > group:
                mx.eval(outs[-1])  # one group of chunks at a time: one lazy graph would hold every chunk's scores
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    d = q.shape[-1]
    fused = next((f for f in FUSED_HEAD_DIMS if f >= d), d)
    if fused != d:
        widen = [(0, 0)] * 3 + [(0, fused - d)]
        q, k, v = mx.pad(q, widen), mx.pad(k, widen), mx.pad(v, widen)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)[..., :d]


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, i, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, clip)
        self.up_proj = ClippableLinear(h, i, clip)
        self.down_proj = ClippableLinear(i, h, clip)

    def __call__(self, x):
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def __call__(self, h, cos, sin, mask):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels, positions, valid):
        w = self.input_proj.weight
        # The processor leaves pixels in [0, 1]; the model maps them to [-1, 1] (no mean/std anywhere).
        h = self.input_proj((2 * (pixels.astype(mx.float32) - 0.5)).astype(w.dtype))
        table = self.position_embedding_table
        where = mx.maximum(positions, 0)
        pos = table[0][where[..., 0]] + table[1][where[..., 1]]
        return h + mx.where(valid[..., None], pos, mx.zeros((), dtype=pos.dtype))


class Tower(nn.Module):
    """`Gemma4VisionModel`: padded patch batches `[B, P, 3*p*p]` with (x, y) ids `[B, P, 2]` (-1 = padding) ->
    the soft tokens of all images, `[sum of tokens, hidden]`, in image order."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = Encoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))
        quarter = args.head_dim // 4
        theta = float(args.rope_parameters.get("rope_theta", 100.0))
        self._inv_freq = 1.0 / theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter))

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        positions = np.asarray(position_ids).astype(np.int32)  # host data from the processor
        B, P, _ = positions.shape
        k = self.args.pooling_kernel_size
        if P % (k * k):
            raise ValueError(f"the patch count {P} is not a multiple of pooling_kernel_size^2 = {k * k}")
        valid_np = ~(positions == -1).all(-1)
        valid = mx.array(valid_np)
        pos = mx.array(positions)
        h = self.patch_embedder(mx.array(pixel_values), pos, valid)
        angles = mx.maximum(pos, 0)[..., None].astype(mx.float32) * self._inv_freq  # [B, P, 2, d/4]
        cos, sin = mx.cos(angles).astype(h.dtype), mx.sin(angles).astype(h.dtype)
        mask = None if valid_np.all() else valid[:, None, None, :]
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask)
        return self._pool(h, positions, valid_np)

    def _pool(self, h: mx.array, positions: np.ndarray, valid: np.ndarray) -> mx.array:
        """Average each k x k block of patches by position, scale by sqrt(hidden), keep the slots that got
        patches, standardise: all in float32, as the reference does from the pooled sum on."""
        B, P, D = h.shape
        k = self.args.pooling_kernel_size
        slots = P // (k * k)
        where = np.maximum(positions, 0)
        width = where[..., 0].max(axis=-1, keepdims=True) + 1
        kernel = where[..., 0] // k + (width // k) * (where[..., 1] // k)  # [B, P]
        onehot = kernel[..., None] == np.arange(slots)  # [B, P, slots]
        keep = onehot.any(axis=1)  # [B, slots]
        h = mx.where(mx.array(valid)[..., None], h, mx.zeros((), dtype=h.dtype))
        weights = mx.array(onehot.transpose(0, 2, 1).astype(np.float32) / (k * k))
        pooled = (weights @ h.astype(mx.float32)).astype(h.dtype)
        pooled = pooled.astype(mx.float32) * math.sqrt(D)
        flat = np.flatnonzero(keep.reshape(-1))
        pooled = pooled.reshape(B * slots, D)[mx.array(flat)]
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)


class Projector(nn.Module):
    """`embed_vision`: weightless RMSNorm, then the vision -> text linear map (the result is not scaled by
    sqrt(text hidden), unlike token embeddings)."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)
        self.eps = eps

    def __call__(self, x):
        return self.embedding_projection(rms_norm_f32(x, None, self.eps))


class VisionModel(nn.Module):
    """The tower and the projector under their checkpoint names."""

    def __init__(self, args: VisionArgs, text_hidden: int):
        super().__init__()
        self.args = args
        self.vision_tower = Tower(args)
        self.embed_vision = Projector(args.hidden_size, text_hidden, args.rms_norm_eps)

    def __call__(self, pixel_values, position_ids) -> mx.array:
        return self.embed_vision(self.vision_tower(pixel_values, position_ids))

    @property
    def dtype(self):
        return self.embed_vision.embedding_projection.weight.dtype
