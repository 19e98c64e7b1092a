"""Rows of a server batch: per-row randomness and the cache surgery that lets requests join and leave.

Rows of different lengths share one `Cache` the way `generate_tokens` batches prompts: right-aligned in one position
frame, with masked left padding. A request is encoded alone (frame 0, so the prompt cache can hold it) and joins a
running batch at a canvas boundary; the batch's frame is then moved to the longest row and every row shifted into
it. Shifting a row by `d` positions rotates its cached keys by `d` (RoPE angles add, so the relative positions the
attention sees are unchanged) and pads or trims its left padding; values carry no position. The surgery is the
cache's own (`Cache.reframe`, `Cache.join`, `Cache.select`), so that a distributed model's cache repeats it on
the other ranks.

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


def stack(model, caches: list, real_lengths: list[list[int]]):
    """One cache holding the rows of `caches` (each a batch cache, its rows' token counts in `real_lengths`), in
    the frame of the longest row. The inputs are reframed in place."""
    offset = max(n for lengths in real_lengths for n in lengths)
    for cache, lengths in zip(caches, real_lengths):
        cache.reframe(model, offset, lengths)
    if len(caches) == 1:
        return caches[0]
    out = model.make_cache()
    out.join(caches, [len(lengths) for lengths in real_lengths])
    return out
