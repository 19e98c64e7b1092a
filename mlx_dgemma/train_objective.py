"""The block-diffusion training objective (`loss_terms`) and the faster GELU training uses on CPUs.

See `train.py` for the recipe: the encoder reads prompt and clean canvases into the cache, the decoder denoises
every corrupted canvas at once with block-causal masks, two-pass self-conditioning, cross-entropy over every
canvas position plus the encoder's autoregressive loss for answers of several canvases.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu
from .cache import Cache
from .train_data import Batch, Noise

# --- a faster activation for training on CPUs -----------------------------------------------------------------

# MLX's CPU backend evaluates tanh one element at a time, and the tanh-approximated GELU of the dense MLP, the
# experts and self-conditioning was over half of a training step on a CPU. Training uses the same function
# computed with `cpu.tanh_rational` (Eigen's rational approximation, exact to a few float32 ulps: |error| < 1e-6 against
# `nn.gelu_approx`), compiled into one fused pass each way. Inference is untouched.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@mx.compile
def _gelu_forward(x):
    return 0.5 * x * (1 + cpu.tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


@mx.compile
def _gelu_backward(x, cotangent):
    t = cpu.tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return cotangent * slope


@mx.custom_function
def gelu_tanh(x):
    """`nn.gelu_approx` (the reference's gelu_pytorch_tanh) within 1e-6, fast on CPUs, with its own gradient."""
    return _gelu_forward(x)


@gelu_tanh.vjp
def _gelu_tanh_vjp(primals, cotangent, output):
    return _gelu_backward(primals, cotangent)


def _training_classes():
    from .model import MLP, SelfConditioning, rms_normalize
    from .switch import Experts

    class TrainingMLP(MLP):
        def __call__(self, x):
            return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))

    class TrainingExperts(Experts):
        def _glu(self, x, indices, sorted_indices):
            gate, up = mx.split(self.gate_up_proj(x, indices, sorted_indices=sorted_indices), 2, axis=-1)
            return self.down_proj(gelu_tanh(gate) * up, indices, sorted_indices=sorted_indices)

    class TrainingSelfConditioning(SelfConditioning):
        def __call__(self, x, soft):
            if soft is not None:
                n = self.pre_norm(soft)
                x = x + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
            return rms_normalize(x, self.eps)

    return {MLP: TrainingMLP, Experts: TrainingExperts, SelfConditioning: TrainingSelfConditioning}


class training_activations:
    """Within the block, the model's GELUs run through `gelu_tanh` (same weights, same modules)."""

    def __init__(self, model):
        self.model, self.swapped = model, []

    def __enter__(self):
        classes = _training_classes()
        for _, module in self.model.named_modules():
            for base, sub in classes.items():
                if type(module) is base:
                    module.__class__ = sub
                    self.swapped.append((module, base))
        return self.model

    def __exit__(self, *exc):
        for module, base in self.swapped:
            module.__class__ = base
        self.swapped = []


# --- the objective ---------------------------------------------------------------------------------------------


def _training_cache(model) -> Cache:
    """A cache that keeps every token (the block-causal masks do the windowing), so all canvases train at once."""
    cache = model.make_cache()
    for layer in cache.layers:
        layer.keep = None
    return cache


def _cache_rows(cache: Cache, rows: mx.array) -> Cache:
    """The same cache restricted to some batch rows (arrays are shared, not copied)."""
    sub = Cache.__new__(Cache)
    sub.__dict__.update(cache.__dict__)
    sub.layers = []
    for layer in cache.layers:
        copy = type(layer).__new__(type(layer))
        copy.__dict__.update(layer.__dict__)
        if layer.keys is not None:
            copy.keys, copy.values = layer.keys[rows], layer.values[rows]
        sub.layers.append(copy)
    sub.token_mask = None if cache.token_mask is None else cache.token_mask[rows]
    return sub


def decode_canvases(model, canvas: mx.array, cache: Cache, offset: int, masks: dict, soft: mx.array | None):
    """The decoder over several canvases at once (positions from `offset`), with explicit block-causal masks."""
    h = model.self_conditioning(model._embed(canvas), soft)
    for layer, layer_cache in zip(model.layers, cache.layers):
        h = layer(h, offset, layer_cache, masks[layer.layer_type], encode=False)
    return model.lm_head(model.norm(h))


def loss_terms(model, batch: Batch, noise: Noise, ar_weight: float = 1.0):
    """(loss, diffusion cross-entropy, autoregressive cross-entropy) for one batch, as MLX scalars."""
    targets = mx.array(batch.targets)
    masks = {k: mx.array(v) for k, v in batch.decoder_masks.items()}
    cache = _training_cache(model)
    mask = None if batch.encoder_mask is None else mx.array(batch.encoder_mask)
    hidden = model.encode(mx.array(batch.encoder_ids), cache, attention_mask=mask)
    noisy = mx.where(mx.array(noise.corrupt), mx.array(noise.noise_ids), targets)
    Lp = batch.prompt_length

    soft = None
    rows = np.flatnonzero(noise.self_conditioning)
    if len(rows):
        # The first pass runs only on the examples that get self-conditioning; the others get none (zeros).
        every = len(rows) == noisy.shape[0]
        take = None if every else mx.array(rows)
        sub_cache = cache if every else _cache_rows(cache, take)
        sub_masks = masks if every else {k: v[take] for k, v in masks.items()}
        first = decode_canvases(model, noisy if every else noisy[take], sub_cache, Lp, sub_masks, None)
        probs = mx.softmax(mx.stop_gradient(first), axis=-1)
        emb = model.embed_tokens_matmul(probs, transpose=False)
        emb = emb * model._embed_scale(emb.dtype)
        if every:
            soft = emb
        else:
            soft = mx.zeros((noisy.shape[0], *emb.shape[1:]), dtype=emb.dtype)
            soft[take] = emb
    logits = decode_canvases(model, noisy, cache, Lp, masks, soft)
    weight = mx.array(batch.canvas_weight)
    diffusion = (nn.losses.cross_entropy(logits, targets) * weight).sum() / weight.sum()

    autoregressive = mx.array(0.0)
    if batch.canvases > 1 and batch.ar_weight.any():
        w = mx.array(batch.ar_weight)
        ar_logits = model.lm_head(hidden[:, Lp - 1 : -1])
        ce = nn.losses.cross_entropy(ar_logits, mx.array(batch.encoder_ids[:, Lp:]))
        autoregressive = (ce * w).sum() / w.sum()
    return diffusion + ar_weight * autoregressive, diffusion, autoregressive
