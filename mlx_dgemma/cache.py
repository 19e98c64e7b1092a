"""Per-layer key/value caches with the reference's (DynamicCache) semantics, and the attention masks built from them.

Only the encoder writes a cache. The decoder reads it: every canvas query sees every cached key a layer holds,
which for a sliding layer is the last `W - 1` tokens, never more (that is what the reference's
`DynamicSlidingWindowLayer` keeps after each update, and what its decoder attends to).
"""

from __future__ import annotations

import mlx.core as mx

from .config import SLIDING, ModelArgs


class LayerCache:
    """Keys `[B, kv, T, d]` (normalised, rotated) and values (normalised) of one layer."""

    def __init__(self, keep: int | None = None):
        self.keep = keep  # None: keep everything (full attention); else the last `keep` tokens
        self.keys = None
        self.values = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append, and return everything this step may attend to (the old kept tokens plus all new ones)."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        if self.keep is not None and keys.shape[2] > self.keep:
            self.keys, self.values = keys[:, :, -self.keep :], values[:, :, -self.keep :]
        else:
            self.keys, self.values = keys, values
        return keys, values

    def with_canvas(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """The cached tokens followed by the canvas's, without changing the cache (the decoder's view)."""
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def state(self):
        return [self.keys, self.values]


class Cache:
    """The KV cache of the whole stack plus the token/padding mask of everything encoded so far."""

    def __init__(self, args: ModelArgs):
        self.sliding_window = args.sliding_window
        self.layer_types = list(args.layer_types)
        self.layers = [LayerCache(args.sliding_window - 1 if t == SLIDING else None) for t in args.layer_types]
        self.offset = 0  # tokens encoded so far: the next token's position
        self.token_mask = None  # [B, offset] bool, True = real token; None while nothing is padded

    def __len__(self):
        return self.offset

    @property
    def batch_size(self) -> int | None:
        for layer in self.layers:
            if layer.keys is not None:
                return layer.keys.shape[0]
        return None

    def remember_mask(self, attention_mask: mx.array | None, batch: int, length: int):
        if attention_mask is None and self.token_mask is None:
            return
        if attention_mask is None:
            attention_mask = mx.ones((batch, length), dtype=mx.bool_)
        attention_mask = attention_mask.astype(mx.bool_)
        if self.token_mask is None:
            self.token_mask = mx.concatenate([mx.ones((batch, self.offset), dtype=mx.bool_), attention_mask], axis=1)
        else:
            self.token_mask = mx.concatenate([self.token_mask, attention_mask], axis=1)

    def select(self, rows: list[int]):
        """Keep only these batch rows (a server's request left the batch)."""
        index = mx.array(rows, dtype=mx.int32)
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        if self.token_mask is not None:
            self.token_mask = self.token_mask[index]

    def state(self):
        arrays = [a for layer in self.layers for a in layer.state() if a is not None]
        return arrays + ([self.token_mask] if self.token_mask is not None else [])

    # --- a server's batch: rows joining and leaving (`server/batch.py`) ----------------------------------------

    def reframe(self, model, offset: int, real_lengths: list[int]):
        """Move every row into the frame that ends at `offset` (in place). `real_lengths` are the rows' token
        counts, none above `offset`: what is cut from the left is padding only. Shifting a row by `d` positions
        rotates its cached keys by `d` (RoPE angles add, so the relative positions attention sees are unchanged)
        and pads or trims its left padding; values carry no position. `model.layers[i].self_attn` rotates."""
        if max(real_lengths) > offset:
            raise ValueError(f"a row of {max(real_lengths)} tokens does not fit a frame of {offset}")
        delta = offset - self.offset
        for layer, lc in zip(model.layers, self.layers):
            if lc.keys is None:
                continue
            length = offset if lc.keep is None else min(offset, lc.keep)
            keys = _fit_left(lc.keys, length, axis=2)
            lc.keys = _rotate(layer.self_attn, keys, delta) if delta else keys
            lc.values = _fit_left(lc.values, length, axis=2)
        if all(n == offset for n in real_lengths):
            self.token_mask = None
        else:
            mask = self.token_mask if self.token_mask is not None else mx.ones((len(real_lengths), self.offset), dtype=mx.bool_)
            self.token_mask = _fit_left(mask, offset, axis=1)
        self.offset = offset

    def join(self, caches: list[Cache], rows: list[int]):
        """Become the rows of `caches` (empty before; `rows[i]` rows each, all in one frame) one after another."""
        self.offset = caches[0].offset
        for i, lc in enumerate(self.layers):
            parts = [c.layers[i] for c in caches]
            if parts[0].keys is not None:
                lc.keys = mx.concatenate([p.keys for p in parts], axis=0)
                lc.values = mx.concatenate([p.values for p in parts], axis=0)
        if any(c.token_mask is not None for c in caches):
            self.token_mask = mx.concatenate([
                c.token_mask if c.token_mask is not None else mx.ones((n, self.offset), dtype=mx.bool_)
                for c, n in zip(caches, rows)
            ], axis=0)

    def snapshot(self):
        """The cache's state, by reference: its arrays are replaced, never modified, when it grows."""
        return self.offset, self.token_mask, [(layer.keys, layer.values) for layer in self.layers]

    def restore(self, snapshot):
        """Go back to a `snapshot()` of this cache."""
        self.offset, self.token_mask, layers = snapshot
        for layer, (keys, values) in zip(self.layers, layers):
            layer.keys, layer.values = keys, values

    # --- masks -------------------------------------------------------------------------------------------------

    def encoder_mask(self, layer_type: str, length: int, cached: int):
        """Mask for `length` new queries over `cached` kept keys plus the new ones (call after `remember_mask`).

        Causal (and windowed on sliding layers) over absolute positions; padded keys are masked except a padded
        query's own key, so a pad row always has one key to attend to and never produces NaN (no real query ever
        attends to a pad key, so real rows are exact).
        """
        start = self.offset  # position of the first new query
        total = cached + length
        window = self.sliding_window if layer_type == SLIDING else None
        needs_window = window is not None and total > window
        if self.token_mask is None and not needs_window:
            return "causal" if length > 1 else None
        q = mx.arange(start, start + length)[:, None]
        k = mx.arange(start - cached, start + length)[None, :]
        mask = k <= q
        if window is not None:
            mask = mask & (k > q - window)
        if self.token_mask is not None:
            keys_real = self.token_mask[:, start - cached : start + length]  # [B, total]
            mask = mask[None] & (keys_real[:, None, :] | (k == q)[None])
            mask = mask[:, None]  # [B, 1, L, K]
        return mask

    def decoder_mask(self, layer_index: int, canvas_length: int):
        """Bidirectional: only padded cached tokens are hidden from the canvas."""
        if self.token_mask is None:
            return None
        cached = self.layers[layer_index].length
        keys_real = self.token_mask[:, self.offset - cached :]
        keys_real = mx.concatenate([keys_real, mx.ones((keys_real.shape[0], canvas_length), dtype=mx.bool_)], axis=1)
        return keys_real[:, None, None, :]


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
