"""Rows of a server batch: per-row randomness and the cache surgery that lets requests join and leave.

Rows of different lengths share one `Cache` the way `generate_tokens` batches prompts: right-aligned in one position
frame, with masked left padding. A request is encoded alone (frame 0, so the prompt cache can hold it) and joins a
running batch at a canvas boundary; the batch's frame is then moved to the longest row and every row shifted into
it. Shifting a row by `d` positions rotates its cached keys by `d` (RoPE angles add, so the relative positions the
attention sees are unchanged) and pads or trims its left padding; values carry no position.

Each row draws its randomness from its own source, so a seeded row samples the same numbers alone or in any batch:
a canvas takes one key from the row's source and the canvas's draws are split off that key in turn, so a row that
finished its canvas early (and sits frozen while the others denoise, drawing numbers it does not use) does not
use up draws its next canvas would have had.
"""

from __future__ import annotations

import mlx.core as mx

from ..diffusion import RandomSource


class RowRandomSource:
    """A batch's randomness as each row's own stream, stacked. Rows join only at canvas boundaries."""

    def __init__(self, sources: list[RandomSource]):
        self.sources = list(sources)
        self._chains: list[mx.array] = []  # per row, the key this canvas's next draw splits from

    def canvas(self, shape, vocab_size: int) -> mx.array:
        draws = []
        self._chains = []
        for source in self.sources:
            canvas_key, chain = mx.random.split(source._key())
            self._chains.append(chain)
            draws.append(mx.random.randint(0, vocab_size, (1, shape[1]), key=canvas_key))
        return mx.concatenate(draws, axis=0)

    def _next(self, make) -> mx.array:
        draws = []
        for i, chain in enumerate(self._chains):
            self._chains[i], key = mx.random.split(chain)
            draws.append(make(key))
        return mx.concatenate(draws, axis=0)

    def uniforms(self, shape) -> mx.array:
        return self._next(lambda key: mx.random.uniform(shape=(1, *shape[1:]), key=key))

    def noise(self, shape, vocab_size: int) -> mx.array:
        return self._next(lambda key: mx.random.randint(0, vocab_size, (1, *shape[1:]), key=key))

    def replace_sample(self, sample: mx.array) -> mx.array:
        return sample

    def keep(self, rows: list[int]):
        """Only these rows go on (the others left the batch mid-canvas)."""
        self.sources = [self.sources[i] for i in rows]
        self._chains = [self._chains[i] for i in rows]


def _rotate(attention, keys: mx.array, delta: int) -> mx.array:
    """Keys `[B, H, T, D]` rotated by `delta` positions each: with one position per sequence, RoPE's angle is the
    offset alone."""
    B, H, T, D = keys.shape
    flat = keys.reshape(B * H * T, 1, D)
    return attention.rope(flat, delta).reshape(B, H, T, D)


def _fit_left(x: mx.array, length: int, axis: int) -> mx.array:
    """Trim or zero-pad `x` on the left along `axis` to `length`."""
    have = x.shape[axis]
    if have > length:
        index = [slice(None)] * x.ndim
        index[axis] = slice(have - length, None)
        return x[tuple(index)]
    if have < length:
        shape = list(x.shape)
        shape[axis] = length - have
        return mx.concatenate([mx.zeros(shape, dtype=x.dtype), x], axis=axis)
    return x


def reframe(model, cache, offset: int, real_lengths: list[int]):
    """Move every row of `cache` into the frame that ends at `offset` (in place). `real_lengths` are the rows'
    token counts, none above `offset`: what is cut from the left is padding only."""
    if max(real_lengths) > offset:
        raise ValueError(f"a row of {max(real_lengths)} tokens does not fit a frame of {offset}")
    delta = offset - cache.offset
    batch = len(real_lengths)
    for layer, lc in zip(model.layers, cache.layers):
        if lc.keys is None:
            continue
        length = offset if lc.keep is None else min(offset, lc.keep)
        keys = _fit_left(lc.keys, length, axis=2)
        lc.keys = _rotate(layer.self_attn, keys, delta) if delta else keys
        lc.values = _fit_left(lc.values, length, axis=2)
    if all(n == offset for n in real_lengths):
        cache.token_mask = None
    else:
        mask = cache.token_mask if cache.token_mask is not None else mx.ones((batch, cache.offset), dtype=mx.bool_)
        cache.token_mask = _fit_left(mask, offset, axis=1)
    cache.offset = offset


def stack(model, caches: list, real_lengths: list[list[int]]):
    """One cache holding the rows of `caches` (each a batch cache, its rows' token counts in `real_lengths`), in
    the frame of the longest row. The inputs are reframed in place."""
    rows = [n for lengths in real_lengths for n in lengths]
    offset = max(rows)
    for cache, lengths in zip(caches, real_lengths):
        reframe(model, cache, offset, lengths)
    if len(caches) == 1:
        return caches[0]
    out = model.make_cache()
    out.offset = offset
    for i, lc in enumerate(out.layers):
        parts = [c.layers[i] for c in caches]
        if parts[0].keys is not None:
            lc.keys = mx.concatenate([p.keys for p in parts], axis=0)
            lc.values = mx.concatenate([p.values for p in parts], axis=0)
    if any(c.token_mask is not None for c in caches):
        out.token_mask = mx.concatenate([
            c.token_mask if c.token_mask is not None else mx.ones((n, offset), dtype=mx.bool_)
            for c, n in zip(caches, (len(lengths) for lengths in real_lengths))
        ], axis=0)
    return out
