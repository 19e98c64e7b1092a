"""The fast sampler's decoder and loop: compaction against the full decoder, the loop's rules, lazy evaluation."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_dgemma
from mlx_dgemma.compact import bucket, denoise_positions, needed_positions, scatter_rows, take_rows
from mlx_dgemma.generate import left_pad, prefill


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model, _ = mlx_dgemma.load(tiny[0])
    return model


def _encoded(model, prompts):
    ids, mask = left_pad(prompts, 0)
    cache = model.make_cache()
    prefill(model, ids, cache, mask)
    return cache


def _soft(model, probs):
    return model.embed_tokens_matmul(probs, transpose=False) * model._embed_scale(mx.float32)


@pytest.mark.parametrize("conditioned", [False, True])
def test_compaction_over_every_position_is_the_full_decoder(tiny_model, conditioned):
    model = tiny_model
    C, V, L = model.args.canvas_length, model.args.vocab_size, model.args.num_hidden_layers
    cache = _encoded(model, [[2, 5, 6, 7, 8, 9, 10, 11, 12, 13], [2, 40, 41]])  # padded; prompt beyond the window
    canvas = mx.random.randint(0, V, (2, C), key=mx.random.key(1))
    probs = mx.softmax(mx.random.normal((2, C, V), key=mx.random.key(2)) * 3, axis=-1) if conditioned else None
    full = model.denoise_raw(canvas, cache, probs)
    positions = mx.broadcast_to(mx.arange(C, dtype=mx.int32), (2, C))
    soft = _soft(model, probs) if conditioned else None
    ours, buffers = denoise_positions(model, canvas, positions, cache, [(None, None)] * L, soft)
    assert mx.abs(ours - full).max().item() < 1e-4
    assert len(buffers) == L and buffers[0][0].shape[2] == C


def test_compaction_reproduces_the_kept_positions(tiny_model):
    """Computing a subset against buffers from a full pass over the same canvas gives the full pass's logits."""
    model = tiny_model
    C, V, L = model.args.canvas_length, model.args.vocab_size, model.args.num_hidden_layers
    cache = _encoded(model, [[2, 5, 6, 7, 8, 9, 10, 11, 12, 13], [2, 40, 41]])
    canvas = mx.random.randint(0, V, (2, C), key=mx.random.key(3))
    probs = mx.softmax(mx.random.normal((2, C, V), key=mx.random.key(4)) * 3, axis=-1)
    soft = _soft(model, probs)
    full, buffers = denoise_positions(model, canvas, mx.broadcast_to(mx.arange(C, dtype=mx.int32), (2, C)), cache,
                                      [(None, None)] * L, soft)
    need = np.zeros((2, C), dtype=bool)
    need[0, [1, 4, 5, 11]] = True
    need[1, [0, 15]] = True
    positions, valid = needed_positions(mx.array(need), bucket(4, C))
    assert positions.shape == (2, 16) and valid.sum().item() == 6
    part, _ = denoise_positions(model, take_rows(canvas, positions), positions, cache, buffers,
                                take_rows(soft, positions))
    expected = take_rows(full, positions)
    assert mx.abs(part - expected).max().item() < 1e-4
    assert np.array(positions)[0, :4].tolist() == [1, 4, 5, 11] and np.array(positions)[1, :2].tolist() == [0, 15]


def test_scatter_rows_writes_valid_slots_and_keeps_the_rest():
    old = mx.arange(10).reshape(2, 5)
    positions, valid = needed_positions(mx.array([[False, True, False, True, False], [False] * 5]), 3)
    out = scatter_rows(old, positions, valid, mx.full((2, 3), -1))
    assert out.tolist() == [[0, -1, 2, -1, 4], [5, 6, 7, 8, 9]]


def test_buckets_cap_the_shapes():
    assert [bucket(n, 256) for n in (1, 16, 17, 100, 256)] == [16, 16, 32, 128, 256]
    assert bucket(3, 20) == 16 and bucket(17, 20) == 20
    assert len({bucket(n, 256) for n in range(1, 257)}) == 10
