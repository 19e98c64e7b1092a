"""The decoder over a subset of canvas positions, with the other positions' keys/values kept from earlier steps.

The reference decoder runs all C canvas positions through every layer at every step. When most positions are
settled (committed, or past a committed end-of-generation id), the fast sampler runs only the live ones: per
layer it keeps a `[B, kv, C, d]` key/value buffer for the whole canvas, writes the fresh keys/values of the
positions it computes into it, and lets their queries attend to the cached prompt plus the whole buffer. With
every position computed the result is the full decoder's (`tests/test_fast_loop.py` checks it).

The number of computed positions is rounded up to a bucket (`bucket`), repeating a position to fill, so a
generation meets at most a handful of shapes and nothing recompiles or caches a graph per count.
"""

from __future__ import annotations

import mlx.core as mx

from .fast_sampler import gathered_soft_embedding

BUCKETS = (4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket(count: int, canvas_length: int, smallest: int = 16) -> int:
    """The computed-position count for `count` positions that need computing (at least 1, at most C), never
    below `smallest` (the device profile's `smallest_bucket`)."""
    for b in BUCKETS:
        if b >= count and b >= smallest:
            return min(b, canvas_length)
    return canvas_length if count <= canvas_length else -(-count // 64) * 64


def needed_positions(need: mx.array, size: int) -> tuple[mx.array, mx.array]:
    """(positions `[B, size]`, valid `[B, size]`): the canvas indices where `need` `[B, C]` holds, ascending,
    then filled with copies of the first one (valid False there). A row with nothing to compute gets copies of
    position C - 1, all invalid."""
    C = need.shape[1]
    ar = mx.arange(C, dtype=mx.int32)
    order = mx.sort(mx.where(need, ar, C + ar), axis=-1)[:, :size]
    valid = order < C
    first = mx.where(valid[:, :1], order[:, :1], C - 1)
    return mx.where(valid, order, first).astype(mx.int32), valid


def scatter_rows(old: mx.array, positions: mx.array, valid: mx.array, new: mx.array) -> mx.array:
    """`old` `[B, C, ...]` with rows `positions` `[B, S]` replaced by `new` `[B, S, ...]` where `valid`.

    Invalid slots write the old value back, and filler copies of the first slot write what the first slot
    writes, so duplicate indices always carry the same value whichever write wins.
    """
    extra = (1,) * (old.ndim - 2)
    idx = positions.reshape(*positions.shape, *extra)
    current = mx.take_along_axis(old, idx, axis=1)
    vmask = valid.reshape(*valid.shape, *extra)
    values = mx.where(vmask, new.astype(old.dtype), current)
    copy_first = (~vmask) & (idx == idx[:, :1])
    values = mx.where(copy_first, values[:, :1], values)
    return mx.put_along_axis(old, mx.broadcast_to(idx, values.shape), values, axis=1)


def take_rows(x: mx.array, positions: mx.array) -> mx.array:
    return mx.take_along_axis(x, positions.reshape(*positions.shape, *((1,) * (x.ndim - 2))), axis=1)


class CanvasKV:
    """One layer's decoder view: the cached prompt plus a whole-canvas key/value buffer that the computed
    positions' fresh keys/values are written into (the decoder's `layer_cache` argument)."""

    def __init__(self, layer_cache, keys: mx.array | None, values: mx.array | None, positions: mx.array):
        self.layer_cache, self.keys, self.values, self.positions = layer_cache, keys, values, positions

    def with_canvas(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, kv, S, d = k.shape
        if self.keys is None:  # first step of a canvas: every position is computed, in order
            self.keys, self.values = k, v
        else:
            idx = mx.broadcast_to(self.positions[:, None, :, None], k.shape)
            self.keys = mx.put_along_axis(self.keys, idx, k, axis=2)
            self.values = mx.put_along_axis(self.values, idx, v, axis=2)
        return self.layer_cache.with_canvas(self.keys, self.values)


def denoise_positions(model, tokens: mx.array, positions: mx.array, cache, buffers, soft: mx.array | None):
    """Raw head outputs `[B, S, V]` for canvas `positions` `[B, S]` holding `tokens` `[B, S]`, and the updated
    per-layer buffers (a list of (keys, values); `None` entries on a canvas's first step, when `positions`
    must be every position in order). `soft` `[B, S, H]` is each position's self-conditioning embedding."""
    C = model.args.canvas_length
    x = model._embed(tokens)
    h = model.self_conditioning(x, soft)
    masks = {t: cache.decoder_mask(i, C) for t, i in model._first_layer.items()}
    offsets = cache.offset + positions
    views = [CanvasKV(lc, *kv, positions) for lc, kv in zip(cache.layers, buffers)]
    for layer, view in zip(model.layers, views):
        h = layer(h, offsets, view, masks[layer.layer_type], encode=False)
    return model.embed_tokens_matmul(model.norm(h), transpose=True), [(v.keys, v.values) for v in views]


def soft_embedding_rows(model, indices: mx.array, probs: mx.array) -> mx.array:
    """Self-conditioning input from each position's top-K ids and probabilities (scaled like `_embed`)."""
    rows = model.embed_tokens(indices)
    return gathered_soft_embedding(rows, probs) * model._embed_scale(rows.dtype)
