"""Sampler math against the facts the reference's own generation tests pin, and against the reference itself."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    StableAndConfidentStoppingCriteria,
)

from mlx_dgemma.sampler import (
    canvas_statistics,
    confident,
    entropy,
    entropy_bound_accept,
    finalize_canvas,
    renoise,
    stable,
    temperature,
    tokens_per_forward,
)


def peaked_logits(values: dict, positions=256, vocab=10_000):
    logits = np.zeros((1, positions, vocab), dtype=np.float32)
    for pos, value in values.items():
        logits[0, pos, pos] = value
    return logits


def test_entropy_of_peaked_logits():
    logits = peaked_logits({0: 18.0, 1: 14.5})
    h = np.array(entropy(mx.array(logits)))
    expected = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().numpy()
    assert np.allclose(h, expected, rtol=1e-4, atol=1e-6)
    assert h[0, 0] == pytest.approx(2.9e-3, rel=0.1)  # the values the reference's tests quote
    assert h[0, 1] == pytest.approx(7.8e-2, rel=0.1)
    assert h[0, 2] == pytest.approx(np.log(10_000), rel=1e-5)  # 9.21, uniform


def test_entropy_bound_accepts_more_with_a_larger_bound():
    # positions 0 and 1 are accepted under both bounds (position 1's own 7.8e-2 is not counted against it);
    # position 2 (7.8e-2 more) only under 0.1.
    logits = mx.array(peaked_logits({0: 18.0, 1: 14.5, 2: 14.5}))
    h = entropy(logits)
    low = np.array(entropy_bound_accept(h, 1e-2))[0]
    high = np.array(entropy_bound_accept(h, 1e-1))[0]
    assert high.sum() == low.sum() + 1
    assert low[:2].all() and high[:3].all()
    assert low.sum() == 2 and high.sum() == 3


@pytest.mark.parametrize("bound", [1e-3, 0.1, 2.0, 50.0])
def test_entropy_bound_accept_matches_the_reference(bound):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 64, 300)) * rng.uniform(0.1, 12, size=(2, 64, 1))).astype(np.float32)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 64, 300, 8)
    current = torch.zeros((2, 64), dtype=torch.long)
    denoised = torch.ones((2, 64), dtype=torch.long)
    accepted = sampler.accept_canvas(current, denoised, torch.from_numpy(logits), None) == 1
    ours = entropy_bound_accept(entropy(mx.array(logits)), bound)
    assert np.array_equal(np.array(ours), accepted.numpy())


def test_renoise_keeps_accepted_samples_and_replaces_the_rest():
    accept = mx.array([[True, False, True, False]])
    out = np.array(renoise(accept, mx.array([[5, 6, 7, 8]]), mx.array([[50, 60, 70, 80]])))
    assert out.tolist() == [[5, 60, 7, 80]]


def test_temperature_schedule():
    assert temperature(48, 48, 0.4, 0.8) == 0.8
    assert temperature(24, 48, 0.4, 0.8) == pytest.approx(0.6)
    assert temperature(1, 48, 0.4, 0.8) == pytest.approx(0.4 + 0.4 / 48)  # never exactly t_min


def test_confidence_rule():
    uniform = mx.zeros((1, 10, 10_000))
    medium = np.zeros((1, 10, 10_000), dtype=np.float32)
    medium[:, :, 0] = 14.5
    low = np.zeros((1, 10, 10_000), dtype=np.float32)
    low[:, :, 0] = 18.0
    h_uniform, h_medium, h_low = entropy(uniform), entropy(mx.array(medium)), entropy(mx.array(low))
    assert not confident(h_uniform, 9.20).item() and confident(h_uniform, 9.22).item()
    assert not confident(h_medium, 1e-2).item() and confident(h_medium, 9.20).item()
    assert confident(h_low, 1e-2).item()


def test_stability_rule():
    a, b = mx.array([[1, 2, 3]]), mx.array([[4, 5, 6]])
    for threshold, expected in [(1, [False, True, True, False]), (2, [False, False, True, False])]:
        history = mx.full((threshold, 1, 3), -1, dtype=mx.int32)
        seen = []
        for canvas in (a, a, a, b):
            is_stable, history = stable(history, canvas)
            seen.append(bool(is_stable.item()))
        assert seen == expected
    assert stable(None, a)[0].item()  # threshold 0: always stable


def test_stop_rule_matches_the_reference():
    rng = np.random.default_rng(1)
    ref = StableAndConfidentStoppingCriteria(stability_threshold=2, confidence_threshold=3.0)
    history = mx.full((2, 2, 8), -1, dtype=mx.int32)
    canvases = [rng.integers(0, 5, (2, 8)) for _ in range(2)]
    for step in range(6):
        canvas = canvases[0] if step < 4 else canvases[1]
        logits = (rng.normal(size=(2, 8, 40)) * (4 if step % 2 else 1)).astype(np.float32)
        expected = ref(torch.from_numpy(canvas), torch.from_numpy(logits)).numpy()
        is_stable, history = stable(history, mx.array(canvas))
        ours = np.array(is_stable & confident(entropy(mx.array(logits)), 3.0))
        assert np.array_equal(ours, expected), step


def test_canvas_statistics_sample_follows_the_distribution():
    logits = mx.array(np.log(np.array([[[0.5, 0.3, 0.15, 0.05]]], dtype=np.float32)))
    logits = mx.broadcast_to(logits, (1, 20_000, 4))
    stats = canvas_statistics(logits, mx.array(1.0), mx.random.uniform(shape=(1, 20_000), key=mx.random.key(0)))
    freq = np.bincount(np.array(stats.sample).ravel(), minlength=4) / 20_000
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    assert (np.array(stats.argmax) == 0).all()
    assert np.allclose(np.array(stats.entropy), -np.sum([p * np.log(p) for p in (0.5, 0.3, 0.15, 0.05)]), atol=1e-5)
    # tempered: entropy of softmax(logits / t)
    stats = canvas_statistics(logits, mx.array(0.5), mx.zeros((1, 20_000)))
    assert np.allclose(np.array(stats.entropy), np.array(entropy(logits / 0.5)), atol=1e-5)
    assert (np.array(stats.sample) == 0).all()  # u = 0 picks the first token with mass


def test_tokens_per_forward_as_the_reference_counts():
    tokens = np.full((1, 100), 5)
    assert tokens_per_forward(tokens, np.array([10]), pad_token_id=1)[0] == 10.0
    tokens[:, -30:] = 1
    assert tokens_per_forward(tokens, np.array([10]), pad_token_id=1)[0] == 7.0
    batch = np.full((2, 90), 5)
    batch[0, -30:] = 1
    batch[1, -15:] = 1
    assert np.allclose(tokens_per_forward(batch, np.array([10, 7]), 1), [60 / 10, 75 / 7])
    assert np.allclose(tokens_per_forward(batch, np.array([10, 7]), None), [9.0, 90 / 7])


def test_finalize_canvas_eos_and_pad_rules():
    canvas = np.array([[5, 1, 6, 1, 7], [5, 6, 7, 8, 9], [4, 4, 4, 4, 4]])
    finished = np.array([False, False, True])
    out, now = finalize_canvas(canvas, finished, eos_ids=[1], pad_token_id=0, reached_max_length=False)
    assert out.tolist() == [[5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]]
    assert now.tolist() == [True, False, True]
    out, now = finalize_canvas(canvas, np.zeros(3, bool), eos_ids=[1], pad_token_id=None, reached_max_length=True)
    assert out.tolist() == canvas.tolist() and now.all()


def test_statistics_apply_the_soft_cap_when_given_raw_logits():
    raw = mx.array(np.random.default_rng(2).normal(size=(2, 8, 1280)).astype(np.float32) * 40)
    u = mx.random.uniform(shape=(2, 8), key=mx.random.key(1))
    fused = canvas_statistics(raw, mx.array(0.6), u, softcap=30.0)
    capped = canvas_statistics(30.0 * mx.tanh(raw / 30.0), mx.array(0.6), u)
    for a, b in zip(fused, capped):  # (the CPU's polynomial tanh is within 3e-7 of libm's)
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)
    probs = np.array(fused.weights) / np.array(fused.total)[..., None]
    expected = torch.softmax(30 * torch.tanh(torch.from_numpy(np.array(raw)) / 30) / 0.6, dim=-1).numpy()
    assert np.allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_cpu_exp_and_tanh_match_libm():
    """The CPU backend's polynomial exp/tanh (used by the sampler there) stay at float32 rounding."""
    from mlx_dgemma import cpu

    x = np.linspace(-87, 0, 100_001).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(np.array(cpu.exp_polynomial(mx.array(x))) - exact) / exact) < 2e-7
    assert np.array(cpu.exp_polynomial(mx.array([-1e4, -88.0, 0.0]))).tolist() == [0.0, 0.0, 1.0]
    y = np.linspace(-30, 30, 200_001).astype(np.float32)
    assert np.max(np.abs(np.array(cpu.tanh_rational(mx.array(y))) - np.tanh(y.astype(np.float64)))) < 4e-7
    z = mx.array(np.linspace(-100, 100, 20_001).astype(np.float32))
    capped = np.array(cpu.soft_cap(z, 30.0, 0.5))  # cap * tanh(z / cap) / temperature, fused
    assert np.max(np.abs(capped - 30.0 * np.tanh(np.array(z, dtype=np.float64) / 30.0) / 0.5)) < 3e-5
