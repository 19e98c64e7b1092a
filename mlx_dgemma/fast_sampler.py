"""The fast sampler's math, as pure functions of arrays (no model, no loop state).

The reference sampler reads the whole vocabulary at every position and step: softmax, entropy, a categorical
draw, and a `[C, V] @ [V, H]` product for self-conditioning. The fast sampler reads only the K most likely
tokens of each position:

* `top_k`: the exact K largest logits, found in two levels (the largest entry of each chunk of 64, then the K
  best chunks' entries) so that only `V / 64 + 64 K` values are partitioned instead of V;
* `top_k_statistics`: probabilities, argmax and a sample over the top K, with an upper bound on the mass of the
  V - K entries left out (each is at most the K-th largest) and, from it, an upper bound on the full entropy
  (acceptance then never trusts a position more than the exact entropy would);
* `gathered_soft_embedding`: self-conditioning as the probability-weighted sum of the top K embedding rows.

`entropy_bounds` states the bound: with `eps` the tail mass and `H_K` the entropy of the renormalised top K,
`H = h(eps) + (1 - eps) H_K + eps H_tail` with `0 <= H_tail <= log(V - K)`, and that is increasing in `eps`
below `1 / (1 + e^max(0, H_K - log(V - K)))` (1/2 when `V - K >= K`), so there `eps`'s upper bound gives the
entropy's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx

CHUNK = 64


def top_k(x: mx.array, k: int, chunk: int = CHUNK) -> tuple[mx.array, mx.array]:
    """(indices, values) of the k largest entries of the last axis, in no particular order.

    Exact: every entry of the top k lies in a chunk whose maximum is among the k largest chunk maxima.
    """
    v = x.shape[-1]
    k = min(k, v)
    if v % chunk or v // chunk < 4 * k:  # small vocabularies: one partition is cheap
        idx = mx.argpartition(-x, k - 1, axis=-1)[..., :k]
        return idx.astype(mx.int32), mx.take_along_axis(x, idx, axis=-1)
    lead = x.shape[:-1]
    blocks = x.reshape(*lead, v // chunk, chunk)
    best = mx.argpartition(-blocks.max(axis=-1), k - 1, axis=-1)[..., :k]
    candidates = mx.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * chunk)
    j = mx.argpartition(-candidates, k - 1, axis=-1)[..., :k]
    idx = mx.take_along_axis(best, j // chunk, axis=-1) * chunk + j % chunk
    return idx.astype(mx.int32), mx.take_along_axis(candidates, j, axis=-1)


def _binary_entropy(p: mx.array) -> mx.array:
    q = mx.clip(p, 1e-30, 1.0)
    r = mx.clip(1.0 - p, 1e-30, 1.0)
    return -(p * mx.log(q) + (1.0 - p) * mx.log(r))


def entropy_bounds(top_entropy: mx.array, tail: mx.array, vocab_size: int, k: int) -> tuple[mx.array, mx.array]:
    """(lower, upper) bounds on the full entropy from the top-K entropy and an upper bound `tail` on the tail
    mass (see the module docstring). Where the entropy need not grow with the tail mass up to `tail` (for
    V - K >= K: tail >= 1/2), the upper bound is log V."""
    rest = vocab_size - k
    if rest <= 0:
        return top_entropy, top_entropy
    log_v = math.log(vocab_size)
    upper = _binary_entropy(tail) + (1.0 - tail) * top_entropy + tail * math.log(rest)
    # d/d(eps) of the bound is log((1 - eps) / eps) + log(V - K) - H_K: positive below this tail mass
    increasing_below = 1.0 / (1.0 + mx.exp(mx.maximum(top_entropy - math.log(rest), 0.0)))
    upper = mx.minimum(mx.where(tail < increasing_below, upper, log_v), log_v)
    return (1.0 - tail) * top_entropy, upper


class TopKStatistics(NamedTuple):
    indices: mx.array  # [..., K] int32 vocabulary ids
    probs: mx.array  # [..., K] float32, the tempered distribution renormalised over the top K
    entropy: mx.array  # [...] upper bound on the full tempered distribution's entropy (nats)
    tail: mx.array  # [...] upper bound on the tempered probability outside the top K
    argmax: mx.array  # [...] int32
    sample: mx.array  # [...] int32, one draw from `probs`


def top_k_statistics(
    logits: mx.array, temp: mx.array, uniforms: mx.array, k: int, softcap: float | None = None
) -> TopKStatistics:
    """What a step needs from raw head outputs `[..., V]`, reading the vocabulary once (for the top K).

    The soft-cap is increasing, so the top K of the raw logits are the top K of the capped ones; the cap and
    the temperature are applied to those K values only.
    """
    vocab = logits.shape[-1]
    idx, raw = top_k(logits, k)
    z = raw.astype(mx.float32)
    if softcap:
        z = softcap * mx.tanh(z / softcap)
    z = z / temp
    top = mx.max(z, axis=-1, keepdims=True)
    shifted = z - top
    w = mx.exp(shifted)
    total = w.sum(axis=-1)
    probs = w / total[..., None]
    top_entropy = mx.log(total) - (w * shifted).sum(axis=-1) / total
    kk = idx.shape[-1]
    tail_sum = (vocab - kk) * mx.exp(mx.min(shifted, axis=-1))
    tail = tail_sum / (total + tail_sum)
    _, upper = entropy_bounds(top_entropy, tail, vocab, kk)
    best = mx.argmax(z, axis=-1, keepdims=True)
    argmax = mx.take_along_axis(idx, best, axis=-1)[..., 0]
    cdf = mx.cumsum(probs, axis=-1)
    pick = mx.minimum(mx.sum(cdf <= (uniforms * cdf[..., -1])[..., None], axis=-1), kk - 1)
    sample = mx.take_along_axis(idx, pick[..., None], axis=-1)[..., 0]
    return TopKStatistics(idx, probs, upper, tail, argmax, sample)


def gathered_soft_embedding(rows: mx.array, probs: mx.array) -> mx.array:
    """Self-conditioning's soft embedding from the top-K embedding rows `[..., K, H]` and their probabilities
    `[..., K]`: `sum_k p_k E[i_k]` in place of `softmax(z) @ E` over the whole vocabulary."""
    return (probs[..., None].astype(rows.dtype) * rows).sum(axis=-2)


def confirm_commits(accept: mx.array, pending: mx.array, agreed: mx.array, argmax: mx.array, given: mx.array,
                    entropy: mx.array, steps: int = 2, max_entropy: float | None = None):
    """The `confirm` rule, per position: (commits, agrees, pending, agreed) after this step.

    A position agrees when it is accepted now, was accepted the step before (`pending`) and its argmax is the token
    it holds (`given`); `agreed` counts agreements in a row. It is committed for good at agreement number
    `steps - 1` (the `steps`-th acceptance in a row), if its entropy is below `max_entropy` (when set); an accepted
    position not committed stays pending, keeping its count while it agrees and starting again when it does not.
    """
    agrees = accept & pending & (argmax == given)
    streak = mx.where(agrees, agreed + 1, 0)
    commits = agrees & (streak >= steps - 1)
    if max_entropy is not None:
        commits = commits & (entropy < max_entropy)
    still = accept & ~commits
    return commits, agrees, still, mx.where(still, streak, 0)
