"""DiffusionGemma's text stack in MLX: one Gemma 4 MoE stack used as a causal encoder and a bidirectional decoder.

The encoder turns tokens into the KV cache (`Model.encode`); the decoder denoises a canvas over that cache without
changing it (`Model.denoise`). Both passes share every weight except the per-layer `layer_scalar`, of which the
checkpoint stores one copy for each, and the decoder-only self-conditioning block.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn

from . import cpu
from .cache import Cache, LayerCache
from .config import FULL, SLIDING, ModelArgs
from .sampler import softmax_parts
from .switch import Experts


def rms_normalize(x: mx.array, eps: float) -> mx.array:
    """RMSNorm without a weight (attention values, router input, self-conditioning output)."""
    return mx.fast.rms_norm(x, None, eps)


class RMSNorm(nn.Module):
    # Gemma 4 multiplies by `w`, not Gemma 2/3's `1 + w`.
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rope_frequencies(head_dim: int, params: dict) -> tuple[float | None, mx.array | None]:
    """(base, periods) for `mx.fast.rope` over the whole head: rotate-half pairs (i, i + head_dim/2).

    "proportional" RoPE rotates only the first `partial_rotary_factor * head_dim / 2` frequency pairs, with the
    exponent taken over the full head_dim; the remaining pairs get an infinite period, so their angle is always
    zero and they pass through unchanged. (This is not NeoX-style partial RoPE, which would pair i with i + dims/2
    inside a shorter rotated slice.)
    """
    rope_type = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", 10_000.0))
    if rope_type == "default":
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("rope_type 'default' with partial_rotary_factor != 1 is not supported")
        return theta, None
    if rope_type != "proportional":
        raise ValueError(f"rope_type {rope_type!r} is not supported (expected 'default' or 'proportional')")
    rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    factor = float(params.get("factor", 1.0))
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    periods = factor * mx.power(mx.array(theta, dtype=mx.float32), exponents)
    periods = mx.concatenate([periods, mx.full((head_dim // 2 - rotated,), mx.inf, dtype=mx.float32)])
    return None, periods


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.layer_type = args.layer_types[index]
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.layer_kv_heads[index]
        self.head_dim = d = args.layer_head_dims[index]
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        if self.layer_type == SLIDING:
            self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        # Full-attention layers have no v_proj: their values are the raw (pre-norm, pre-RoPE) key projection.
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.eps = args.rms_norm_eps
        self._rope_base, self._rope_periods = rope_frequencies(d, args.rope_parameters[self.layer_type])

    def rope(self, x: mx.array, offset) -> mx.array:
        """RoPE from position `offset` on (an int), or at positions `offset` `[B, L]` (the compacted decoder's
        scattered canvas positions: each token becomes a batch entry of length 1 with its own offset)."""
        if isinstance(offset, mx.array) and offset.ndim == 2:
            B, n, L, d = x.shape
            one = x.transpose(0, 2, 1, 3).reshape(B * L, n, 1, d)
            return self.rope(one, offset.reshape(-1)).reshape(B, L, n, d).transpose(0, 2, 1, 3)
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self._rope_base, scale=1.0, offset=offset, freqs=self._rope_periods
        )

    def __call__(self, x: mx.array, offset, layer_cache: LayerCache, mask, encode: bool) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k_raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v_raw = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if "v_proj" in self else k_raw
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), offset)
        k = self.rope(self.k_norm(k_raw).transpose(0, 2, 1, 3), offset)
        v = rms_normalize(v_raw, self.eps).transpose(0, 2, 1, 3)
        k, v = layer_cache.update(k, v) if encode else layer_cache.with_canvas(k, v)
        # Gemma 4 scores are unscaled (scale 1.0): q and k are RMS-normalised instead.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps

    def __call__(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert ids and weights for the raw residual stream `h` (not a normed copy of it)."""
        x = rms_normalize(h, self.eps) * (self.scale * h.shape[-1] ** -0.5)
        logits = self.proj(x).astype(mx.float32)
        # The choice of experts carries no gradient (training differentiates through the weights only).
        idx = mx.stop_gradient(mx.argpartition(-logits, self.top_k - 1, axis=-1)[..., : self.top_k])
        # softmax over all experts, then renormalised over the chosen k == softmax over the chosen k's logits
        weights = mx.softmax(mx.take_along_axis(logits, idx, axis=-1), axis=-1)
        return idx, weights * self.per_expert_scale[idx]


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.layer_type = args.layer_types[index]
        self.self_attn = Attention(args, index)
        self.mlp = MLP(h, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.layer_scalar = mx.ones((1,))  # decoder pass
        self.encoder_layer_scalar = mx.ones((1,))  # encoder pass (a separate tensor in the checkpoint)

    def __call__(self, h: mx.array, offset: int, layer_cache: LayerCache, mask, encode: bool) -> mx.array:
        a = self.self_attn(self.input_layernorm(h), offset, layer_cache, mask, encode)
        h = h + self.post_attention_layernorm(a)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        idx, weights = self.router(h)
        routed = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(h), idx, weights))
        h = h + self.post_feedforward_layernorm(dense + routed)
        return h * (self.encoder_layer_scalar if encode else self.layer_scalar)


class SelfConditioning(nn.Module):
    """Mixes the soft embedding of the previous step's distribution into the canvas embedding."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.eps = args.rms_norm_eps

    def __call__(self, x: mx.array, soft: mx.array | None) -> mx.array:
        # Without a signal the MLP's output is exactly zero, so only the (weightless) post-norm remains.
        if soft is not None:
            n = self.pre_norm(soft)
            x = x + self.down_proj(nn.gelu_approx(self.gate_proj(n)) * self.up_proj(n))
        return rms_normalize(x, self.eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)

    # --- public API ------------------------------------------------------------------------------------------

    def make_cache(self) -> Cache:
        return Cache(self.args)

    def encode(self, input_ids: mx.array, cache: Cache, attention_mask: mx.array | None = None, *, images=None) -> mx.array:
        """Append `input_ids` `[B, L]` to the cache (causally, at positions after the cache) and return the
        final hidden states `[B, L, H]`. `attention_mask` (1 = token, 0 = left padding) is remembered.
        `images` (`vision.prompt.PromptImages`, for these columns) splices image soft tokens in at the image
        tokens and lays the image-block rule over the masks."""
        input_ids = mx.array(input_ids)
        B, L = input_ids.shape
        if attention_mask is not None:
            attention_mask = mx.array(attention_mask)
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, L)}")
        cache.remember_mask(attention_mask, B, L)
        masks = {
            t: cache.encoder_mask(t, L, cache.layers[self._first_layer[t]].length) for t in self._first_layer
        }
        h = self._embed(input_ids)
        if images is not None:
            h = images.splice(h)
            kept = {t: cache.layers[i].length for t, i in self._first_layer.items()}
            masks = images.masks(masks, cache.offset, kept, self.args.sliding_window)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cache.offset, layer_cache, masks[layer.layer_type], encode=True)
        cache.offset += L
        return self.norm(h)

    def denoise(
        self,
        canvas: mx.array,
        cache: Cache,
        self_conditioning_logits: mx.array | None = None,
        *,
        self_conditioning_probs: mx.array | None = None,
    ) -> mx.array:
        """Float32 soft-capped logits `[B, C, V]` for the canvas at the positions right after the cache.

        The cache is read, never written. Self-conditioning takes the previous step's (tempered) logits, or
        their probabilities. Logits take the generation loop's path (the softmax per lane, left unnormalised).
        """
        distribution, total = self_conditioning_probs, None
        if distribution is None and self_conditioning_logits is not None:
            distribution, total = softmax_parts(self_conditioning_logits, self.dtype)
        return self.softcap(self.denoise_raw(canvas, cache, distribution, total))

    def denoise_raw(
        self, canvas: mx.array, cache: Cache, distribution=None, total: mx.array | None = None
    ) -> mx.array:
        """The LM head's output before the soft-cap (the sampler fuses the cap into its own pass).

        `distribution` `[B, C, V]` is the previous step's tempered distribution: probabilities, or unnormalised
        weights whose sums are `total` `[B, C]` (dividing the `[B, C, H]` soft embedding is cheaper than
        normalising the weights). It may come as a list of consecutive position chunks (the sampler's lanes).
        """
        x = self._embed(mx.array(canvas))
        soft = None
        if distribution is not None:
            if isinstance(distribution, (list, tuple)):
                # one product over all positions: each chunk's own would read the whole embedding again
                distribution = distribution[0] if len(distribution) == 1 else mx.concatenate(distribution, axis=1)
            soft = self.embed_tokens_matmul(distribution, transpose=False)
            if total is not None:
                soft = soft / total[..., None].astype(soft.dtype)
            soft = soft * self._embed_scale(x.dtype)
        h = self.self_conditioning(x, soft)
        C = x.shape[1]
        masks = {t: cache.decoder_mask(i, C) for t, i in self._first_layer.items()}
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cache.offset, layer_cache, masks[layer.layer_type], encode=False)
        return self.embed_tokens_matmul(self.norm(h), transpose=True)

    def softcap(self, logits: mx.array) -> mx.array:
        """The reference's final soft-cap, in float32."""
        logits = logits.astype(mx.float32)
        cap = self.args.final_logit_softcapping
        if not cap:
            return logits
        parts = cpu.map_positions(logits.shape[-2], lambda rows: cpu.soft_cap(logits[..., rows, :], cap))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)

    def lm_head(self, h: mx.array) -> mx.array:
        return self.softcap(self.embed_tokens_matmul(h, transpose=True))

    # --- pieces ----------------------------------------------------------------------------------------------

    @property
    def _first_layer(self) -> dict[str, int]:
        return {t: self.args.layer_types.index(t) for t in (SLIDING, FULL) if t in self.args.layer_types}

    def _embed_scale(self, dtype) -> mx.array:
        # The reference casts sqrt(H) to the weight dtype first (53.0 rather than 53.066 in bfloat16).
        return mx.array(math.sqrt(self.args.hidden_size), dtype=mx.float32).astype(dtype)

    def _embed(self, ids: mx.array) -> mx.array:
        x = self.embed_tokens(ids)
        return x * self._embed_scale(x.dtype)

    def embed_tokens_matmul(self, x: mx.array, transpose: bool) -> mx.array:
        """`x @ E.T` (tied LM head) or `x @ E` (soft embedding), for plain or quantized embeddings."""
        e = self.embed_tokens
        if isinstance(e, nn.QuantizedEmbedding):
            return mx.quantized_matmul(
                x, e.weight, e.scales, e.get("biases"), transpose=transpose, group_size=e.group_size, bits=e.bits,
                mode=getattr(e, "mode", "affine"),
            )
        w = e.weight
        return x.astype(w.dtype) @ (w.T if transpose else w)

    @property
    def layer_types(self) -> list[str]:
        return self.args.layer_types

    @property
    def dtype(self):
        """The activations' dtype. Read from the final norm: it is never quantized, whereas a quantized embedding
        holds integers (and mxfp modes keep uint8 scales)."""
        return self.norm.weight.dtype

    # --- checkpoint names ------------------------------------------------------------------------------------

    def sanitize(self, weights: dict) -> dict:
        """Map Hugging Face names to ours (already-converted names pass through); drop what the text model
        does not hold (vision weights, tied copies, rotary buffers)."""
        out = {}
        for name, value in weights.items():
            mapped = checkpoint_name(name)
            if mapped is None or mapped.startswith(VISION_PREFIXES):
                continue
            out[mapped] = value
        return out


# The one table of checkpoint names. Hugging Face name -> our name; None = not a tensor of its own (tied copies,
# recomputed buffers). Anything that matches no rule is unexpected.
VISION_PREFIXES = ("vision_tower.", "embed_vision.")
_NAME_RULES = [
    (r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar", r"layers.\1.encoder_layer_scalar"),
    (r"model\.decoder\.layers\.(\d+)\.experts\.(gate_up_proj|down_proj)", r"layers.\1.experts.\2.weight"),
    (r"model\.decoder\.(.+)", r"\1"),
    (r"model\.encoder\.(vision_tower\..+|embed_vision\..+)", r"\1"),
    # The encoder's text weights are tied to the decoder's and lm_head to the embedding; save_pretrained writes
    # them once, under the decoder's names, but a checkpoint saved without de-duplication may repeat them.
    (r"model\.encoder\.language_model\..+", None),
    (r"lm_head\.weight", None),
    (r".*rotary_emb\..+", None),
]
_OUR_NAME = re.compile(
    r"(embed_tokens|norm|self_conditioning|layers\.\d+|vision_tower|embed_vision)\."
)


def checkpoint_name(name: str) -> str | None:
    """Our name for a checkpoint tensor (Hugging Face or already converted); None if it is a tied copy."""
    for pattern, target in _NAME_RULES:
        if re.fullmatch(pattern, name):
            return None if target is None else re.sub(pattern, target, name)
    if _OUR_NAME.match(name):
        return name
    raise KeyError(name)
