"""The block-diffusion sampler's math, as pure functions of arrays (no model, no loop state).

One denoising step, in the reference's order: temper the logits (`temperature`), read everything the step needs
from them in one pass (`canvas_statistics`: probabilities, entropy, argmax, a categorical sample), accept the
lowest-entropy positions within the entropy bound (`entropy_bound_accept`), re-noise everything else (`renoise`)
and decide whether the canvas is done (`stable`, `confident`). After the canvas, `finalize_canvas` applies the
EOS/pad rules on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import cpu


def temperature(step: int, n_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule over the steps *remaining* (`step` counts down n_steps..1): t_max first, never t_min."""
    return t_min + (t_max - t_min) * (step / n_steps)


class CanvasStatistics(NamedTuple):
    weights: mx.array  # [B, C, V] float32, exp(z - max z): the tempered distribution, unnormalised
    total: mx.array  # [B, C] sum of the weights (softmax = weights / total)
    entropy: mx.array  # [B, C] float32, natural log
    argmax: mx.array  # [B, C]
    sample: mx.array  # [B, C], one categorical draw per position


def canvas_statistics(
    logits: mx.array, temp: mx.array, uniforms: mx.array, softcap: float | None = None
) -> CanvasStatistics:
    """Everything a step needs from the tempered logits, with the log-normaliser computed once.

    With `softcap`, `logits` are the raw head outputs and the reference's float32 soft-cap is applied here, so
    that it fuses with the tempering into one pass over the B x C x V logits. `uniforms` `[B, C]` in [0, 1) drive
    inverse-CDF sampling: one random number per position instead of one per vocabulary entry (Gumbel-max),
    which would cost a full pass of random generation.
    """
    z = logits.astype(mx.float32)
    z = cpu.soft_cap(z, softcap, temp) if softcap else z / temp
    shifted, weights, total, ent = _softmax_entropy(z)
    return CanvasStatistics(weights, total, ent, mx.argmax(z, axis=-1), sample_categorical(weights, uniforms))


def _softmax_entropy(z: mx.array):
    """(z - max, exp of it, its sum, entropy), accurate in float32 for peaked and flat distributions alike.

    After shifting by the max, the top weight is exactly 1; a running float32 sum that meets the 1 first drops
    every term below 6e-8 of it, which loses all the entropy of a confident position. Summing the other
    weights on their own and taking log1p keeps them.
    """
    shifted = z - mx.max(z, axis=-1, keepdims=True)
    weights = cpu.exp_nonpositive(shifted)
    top_ties = _sum_last((shifted == 0).astype(mx.float32))
    rest = _sum_last(mx.where(shifted < 0, weights, 0.0)) + (top_ties - 1)
    # every term of the sum is <= 0: no cancellation
    ent = mx.log1p(rest) - _sum_last(weights * shifted) / (1 + rest)
    return shifted, weights, 1 + rest, ent


BLOCK = 256


def _blocked(v: int) -> bool:
    return v > 4 * BLOCK and v % BLOCK == 0


def _sum_last(x: mx.array) -> mx.array:
    """Sum over the last axis in two levels: a running float32 sum over 262,144 entries drifts by ~1e-4
    relative; blocks of 256 keep the error near float32's."""
    v = x.shape[-1]
    if _blocked(v):
        return x.reshape(*x.shape[:-1], v // BLOCK, BLOCK).sum(axis=-1).sum(axis=-1)
    return x.sum(axis=-1)


def _inverse_cdf(weights: mx.array, targets: mx.array) -> mx.array:
    """Index of the first entry whose running sum exceeds the target (zero-weight entries are never chosen)."""
    cdf = mx.cumsum(weights, axis=-1)
    return mx.minimum(mx.sum(cdf <= targets[..., None], axis=-1), weights.shape[-1] - 1)


def sample_categorical(weights: mx.array, uniforms: mx.array) -> mx.array:
    """One draw per row from unnormalised `weights` `[..., V]`, by inverse CDF with one uniform per row.

    For a large vocabulary the draw picks a block of 256 entries from the block sums, then an entry inside it:
    one read of the weights instead of a full cumulative sum, and better-conditioned sums.
    """
    v = weights.shape[-1]
    if not _blocked(v):
        return _inverse_cdf(weights, uniforms * weights.sum(axis=-1))
    blocks = weights.reshape(*weights.shape[:-1], v // BLOCK, BLOCK)
    block_sums = blocks.sum(axis=-1)
    cdf = mx.cumsum(block_sums, axis=-1)
    targets = uniforms * cdf[..., -1]
    chosen = mx.minimum(mx.sum(cdf <= targets[..., None], axis=-1), v // BLOCK - 1)
    before = mx.take_along_axis(cdf - block_sums, chosen[..., None], axis=-1)[..., 0]
    inside = mx.take_along_axis(blocks, chosen[..., None, None], axis=-2)[..., 0, :]
    return chosen * BLOCK + _inverse_cdf(inside, targets - before)


def entropy(logits: mx.array) -> mx.array:
    """Entropy (nats) of softmax(logits) over the last axis."""
    return _softmax_entropy(logits.astype(mx.float32))[3]


def softmax(logits: mx.array) -> mx.array:
    """Softmax over the last axis with the same normaliser as the statistics (for self-conditioning logits)."""
    _, weights, total, _ = _softmax_entropy(logits.astype(mx.float32))
    return weights / total[..., None]


def softmax_parts(logits: mx.array, dtype) -> tuple[list[mx.array], mx.array]:
    """softmax(logits) `[B, C, V]` in the form the generation loop hands the decoder its self-conditioning:
    unnormalised weights in position chunks (one pass per lane, see `cpu.map_positions`), cast to `dtype`, and
    their sums `[B, C]` (the decoder divides the small soft embedding instead of the weights)."""

    def chunk(rows):
        _, weights, total, _ = _softmax_entropy(logits[..., rows, :].astype(mx.float32))
        return weights.astype(dtype), total

    parts = cpu.map_positions(logits.shape[-2], chunk)
    totals = [t for _, t in parts]
    return [w for w, _ in parts], totals[0] if len(totals) == 1 else mx.concatenate(totals, axis=-1)


def entropy_bound_accept(entropy: mx.array, bound: float) -> mx.array:
    """Accept the k lowest-entropy positions with sum(H_1..H_k) - H_k <= bound (EB-sampler, arXiv 2505.24857).

    The sum leaves out the largest accepted entropy, so the single most certain position is always accepted.
    """
    order = mx.argsort(entropy, axis=-1)
    sorted_h = mx.take_along_axis(entropy, order, axis=-1)
    accepted_sorted = (mx.cumsum(sorted_h, axis=-1) - sorted_h) <= bound
    accept = mx.zeros(entropy.shape, dtype=mx.bool_)
    return mx.put_along_axis(accept, order, accepted_sorted, axis=-1)


def renoise(accept: mx.array, sample: mx.array, noise: mx.array) -> mx.array:
    """Accepted positions keep their sample; every other position gets fresh uniform noise (the previous canvas
    is discarded, as in the reference)."""
    return mx.where(accept, sample.astype(noise.dtype), noise)


def stable(history: mx.array | None, argmax: mx.array) -> tuple[mx.array, mx.array | None]:
    """Rows whose argmax canvas equals each of the last S argmax canvases; returns (stable [B], new history).

    `history` is `[S, B, C]` starting at -1 (so a canvas needs S+1 steps to be stable), or None for S = 0.
    """
    if history is None:
        return mx.ones((argmax.shape[0],), dtype=mx.bool_), None
    is_stable = mx.all(history == argmax[None], axis=(0, 2))
    return is_stable, mx.concatenate([history[1:], argmax[None].astype(history.dtype)], axis=0)


def confident(entropy: mx.array, threshold: float) -> mx.array:
    """Rows whose mean per-position entropy is below the threshold."""
    return mx.mean(entropy, axis=-1) < threshold


def tokens_per_forward(new_tokens: np.ndarray, passes: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """Generated tokens (pads excluded) per decoder pass, per row, as the reference reports it."""
    valid = (new_tokens != pad_token_id).sum(-1) if pad_token_id is not None else np.full(len(passes), new_tokens.shape[1])
    return valid / np.maximum(passes, 1)


def finalize_canvas(
    canvas: np.ndarray,
    finished: np.ndarray,
    eos_ids: list[int],
    pad_token_id: int | None,
    reached_max_length: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """EOS and pad rules after a canvas (host side, like the reference's `_finalize_canvas`).

    A row finishes when the canvas holds an EOS id or the length budget is reached. With a pad id: rows that
    had finished in an earlier canvas get an all-pad canvas, and in every row the tokens after the canvas's first
    EOS become pad (the EOS itself stays).
    """
    canvas = canvas.copy()
    is_eos = np.isin(canvas, eos_ids) if eos_ids else np.zeros(canvas.shape, dtype=bool)
    finished_now = is_eos.any(axis=1) | reached_max_length
    now = finished | finished_now
    if pad_token_id is not None and now.any():
        canvas[finished] = pad_token_id
        if eos_ids and finished_now.any():
            seen = np.cumsum(is_eos, axis=1)
            canvas[(seen > 0) & ~((seen == 1) & is_eos)] = pad_token_id
    return canvas, now
