"""The fast sampler's pure functions against direct full-vocabulary computations."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma.fast_sampler import entropy_bounds, gathered_soft_embedding, top_k, top_k_statistics
from mlx_dgemma.sampler import entropy


def _logits(rows, vocab, scale, seed=0):
    """Random logits; larger `scale` = more peaked distributions."""
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((rows, vocab)) * scale).astype(np.float32))


@pytest.mark.parametrize("vocab,k", [(16384, 64), (16384, 8), (68, 16), (1000, 64)])
def test_top_k_is_exact(vocab, k):
    x = _logits(6, vocab, 3.0)
    idx, vals = top_k(x, k)
    expected = np.sort(np.array(x), axis=-1)[:, ::-1][:, :k]
    assert np.array_equal(np.sort(np.array(vals), axis=-1)[:, ::-1], expected)
    assert np.array_equal(np.take_along_axis(np.array(x), np.array(idx), axis=-1), np.array(vals))
    assert all(len(set(row)) == k for row in np.array(idx).tolist())


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0, 20.0, 60.0])
def test_top_k_entropy_brackets_the_full_entropy(scale):
    vocab, k = 16384, 64
    raw = _logits(32, vocab, scale, seed=1)
    temp = mx.array(0.7)
    stats = top_k_statistics(raw, temp, mx.zeros((32,)), k, softcap=30.0)
    z = 30.0 * mx.tanh(raw / 30.0) / temp
    exact = np.array(entropy(z))
    p = np.array(mx.softmax(z, axis=-1))
    true_tail = 1 - np.take_along_axis(p, np.array(stats.indices), axis=-1).sum(-1)
    assert np.all(np.array(stats.tail) >= true_tail - 1e-6)  # the tail bound is an upper bound
    probs = np.array(stats.probs)
    h_top = -(probs * np.log(np.maximum(probs, 1e-30))).sum(-1)
    lower, upper = (np.array(b) for b in entropy_bounds(mx.array(h_top), stats.tail, vocab, k))
    assert np.all(lower <= exact + 1e-4) and np.all(exact <= upper + 1e-4)
    assert np.allclose(np.array(stats.entropy), upper, atol=1e-5)
    peaked = np.array(stats.tail) < 1e-6
    assert np.allclose(upper[peaked], exact[peaked], atol=1e-4)  # where the tail is negligible, so is the gap
    zn = np.array(z)  # the argmax is a most likely token (ties at the soft-cap's ceiling may pick another)
    assert np.array_equal(np.take_along_axis(zn, np.array(stats.argmax)[:, None], -1)[:, 0], zn.max(-1))


def test_top_k_sample_follows_the_top_k_distribution():
    raw = mx.broadcast_to(mx.log(mx.array([0.5, 0.3, 0.2] + [1e-9] * 1021)), (2000, 1024))
    u = mx.random.uniform(shape=(2000,), key=mx.random.key(0))
    stats = top_k_statistics(raw, mx.array(1.0), u, 3)
    counts = np.bincount(np.array(stats.sample), minlength=3)[:3] / 2000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.04)
    assert set(np.array(stats.sample).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("scale", [8.0, 20.0])
def test_gathered_self_conditioning_matches_the_full_product_on_peaked_rows(scale):
    vocab, hidden, k = 4096, 32, 64
    z = _logits(16, vocab, scale, seed=2)
    embed = mx.array(np.random.default_rng(3).standard_normal((vocab, hidden)).astype(np.float32))
    full = mx.softmax(z, axis=-1) @ embed
    stats = top_k_statistics(z, mx.array(1.0), mx.zeros((16,)), k)
    gathered = gathered_soft_embedding(embed[stats.indices], stats.probs)
    # renormalising over the top K moves at most 2 * tail of the mass
    bound = 2 * np.array(stats.tail)[:, None] * np.abs(np.array(embed)).max() + 1e-5
    assert np.all(np.abs(np.array(gathered - full)) <= bound)
    if scale >= 20.0:
        assert np.allclose(np.array(gathered), np.array(full), atol=1e-4)


def test_entropy_bounds_without_a_tail_are_the_top_k_entropy():
    h = mx.array([0.0, 1.0, math.log(8)])
    lower, upper = entropy_bounds(h, mx.zeros((3,)), 8, 8)
    assert np.allclose(np.array(lower), np.array(h)) and np.allclose(np.array(upper), np.array(h))


@pytest.mark.parametrize("steps,max_entropy", [(2, None), (3, None), (2, 0.05), (4, 0.05)])
def test_confirm_commits_follows_each_position_step_by_step(steps, max_entropy):
    """The confirm rule on random step sequences against a direct per-position loop: a position commits at the
    `steps`-th acceptance in a row whose later acceptances all saw the held token as the argmax (and, with a
    ceiling, an entropy below it); committed positions leave the rule."""
    from mlx_dgemma.fast_sampler import confirm_commits

    rng = np.random.default_rng(steps)
    T, P = 12, 400
    accept = rng.random((T, P)) < 0.7
    same = rng.random((T, P)) < 0.8  # argmax == the held token
    entropy = rng.random((T, P)) * 0.1
    # direct: one position at a time
    want = np.zeros((T, P), dtype=bool)
    for p in range(P):
        pending, run, done = False, 0, False
        for t in range(T):
            if done:
                continue
            agrees = accept[t, p] and pending and same[t, p]
            run = run + 1 if agrees else 0
            commit = agrees and run >= steps - 1 and (max_entropy is None or entropy[t, p] < max_entropy)
            want[t, p], done = commit, commit
            pending = accept[t, p] and not commit
            run = run if pending else 0
    # the rule, all positions at once
    pending, agreed, closed = mx.zeros((P,), mx.bool_), mx.zeros((P,), mx.int32), np.zeros(P, dtype=bool)
    given = mx.zeros((P,), mx.int32)
    for t in range(T):
        live = mx.array(~closed)
        argmax = mx.where(mx.array(same[t]), given, given + 1)
        commits, _, now_pending, now_agreed = confirm_commits(
            mx.array(accept[t]) & live, pending, agreed, argmax, given, mx.array(entropy[t], mx.float32),
            steps, max_entropy)
        got = np.array(commits)
        assert np.array_equal(got, want[t]), t
        closed |= got
        pending, agreed = now_pending & live, mx.where(live, now_agreed, 0)
    assert want.any() and not want.all()
