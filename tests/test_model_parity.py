"""The MLX model against transformers 5.24.0 in float32 (≤ 1e-4 absolute) on tiny reference checkpoints."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache

import mlx_dgemma
from reference import rewrite_config_global_form

TOL = 1e-4


def ref_encode(ref, ids, cache, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = ref.model.encoder(
            input_ids=torch.as_tensor(ids), cache=cache, attention_mask=attention_mask, position_ids=position_ids
        )
    return out.last_hidden_state.numpy()


def ref_denoise(ref, canvas, cache, sc=None, decoder_attention_mask=None, positions=None):
    with torch.no_grad():
        out = ref(
            decoder_input_ids=torch.as_tensor(canvas), cache=cache, self_conditioning_logits=sc,
            decoder_attention_mask=decoder_attention_mask, decoder_position_ids=positions,
        )
    return out.logits.numpy()


def err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def tiny_mlx(tiny):
    folder, ref = tiny
    model, tokenizer = mlx_dgemma.load(folder)
    return folder, ref, model


def test_load_returns_no_tokenizer_without_tokenizer_files(tiny):
    _, tokenizer = mlx_dgemma.load(tiny[0])
    assert tokenizer is None


def test_encoder_hidden_states_and_cache(tiny_mlx):
    _, ref, model = tiny_mlx
    ids = np.array([[2] + list(range(10, 21))])
    rcache = DynamicCache(config=ref.config.text_config)
    expected = ref_encode(ref, ids, rcache)
    cache = model.make_cache()
    hidden = model.encode(mx.array(ids), cache)
    assert hidden.shape == (1, 12, 64)
    assert err(hidden, expected) < TOL
    for i, layer in enumerate(rcache.layers):
        assert cache.layers[i].keys.shape == tuple(layer.keys.shape)  # sliding layers keep W-1 = 7
        assert err(cache.layers[i].keys, layer.keys) < TOL
        assert err(cache.layers[i].values, layer.values) < TOL
    assert len(cache) == 12


@pytest.mark.parametrize("with_sc", [False, True])
def test_decoder_logits(tiny_mlx, with_sc, profile):
    _, ref, model = tiny_mlx
    rng = np.random.default_rng(0)
    ids = np.array([[2] + list(range(30, 41))])
    canvas = rng.integers(0, 512, (1, 16))
    sc = rng.normal(size=(1, 16, 512)).astype(np.float32) * 3 if with_sc else None
    rcache = DynamicCache(config=ref.config.text_config)
    ref_encode(ref, ids, rcache)
    expected = ref_denoise(ref, canvas, rcache, None if sc is None else torch.from_numpy(sc))
    cache = model.make_cache()
    model.encode(mx.array(ids), cache)
    before = [np.array(layer.keys) for layer in cache.layers]
    logits = model.denoise(mx.array(canvas), cache, None if sc is None else mx.array(sc))
    assert logits.dtype == mx.float32 and logits.shape == (1, 16, 512)
    assert err(logits, expected) < TOL
    assert np.abs(np.array(logits)).max() <= 30.0
    assert all(np.array_equal(b, np.array(layer.keys)) for b, layer in zip(before, cache.layers))  # cache unchanged
    assert len(cache) == 12


def test_prompt_longer_than_sliding_window_and_second_canvas(tiny_mlx, profile):
    """A 21-token prompt (window 8) in one encode; then a finished canvas re-encoded at its decoder positions."""
    _, ref, model = tiny_mlx
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 512, (1, 21))
    canvas1, canvas2 = rng.integers(0, 512, (2, 1, 16))
    rcache = DynamicCache(config=ref.config.text_config)
    cache = model.make_cache()
    assert err(model.encode(mx.array(ids), cache), ref_encode(ref, ids, rcache)) < TOL
    assert err(model.denoise(mx.array(canvas1), cache), ref_denoise(ref, canvas1, rcache)) < TOL
    # commit canvas 1: encode it causally at positions 21..36
    expected = ref_encode(ref, canvas1, rcache, position_ids=torch.arange(21, 37)[None])
    assert err(model.encode(mx.array(canvas1), cache), expected) < TOL
    assert cache.layers[0].keys.shape[2] == 7 and cache.layers[1].keys.shape[2] == 37
    assert err(model.denoise(mx.array(canvas2), cache), ref_denoise(ref, canvas2, rcache)) < TOL


def test_chunked_encoding_equals_one_encode(tiny_mlx):
    _, _, model = tiny_mlx
    ids = mx.array(np.random.default_rng(2).integers(5, 512, (1, 30)))
    canvas = mx.array(np.random.default_rng(3).integers(0, 512, (1, 16)))
    whole = model.make_cache()
    model.encode(ids, whole)
    chunked = model.make_cache()
    for start in range(0, 30, 7):
        model.encode(ids[:, start : start + 7], chunked)
    assert err(model.denoise(canvas, whole), model.denoise(canvas, chunked)) < 1e-5


def test_batch_of_two_with_left_padding(tiny_mlx, profile):
    _, ref, model = tiny_mlx
    rng = np.random.default_rng(4)
    pads = 5
    ids = rng.integers(5, 512, (2, 14))
    ids[1, :pads] = 0
    mask = np.ones((2, 14), dtype=bool)
    mask[1, :pads] = False
    canvas = rng.integers(0, 512, (2, 16))
    sc = rng.normal(size=(2, 16, 512)).astype(np.float32)
    rcache = DynamicCache(config=ref.config.text_config)
    expected_h = ref_encode(ref, ids, rcache, attention_mask=torch.from_numpy(mask))
    dmask = torch.from_numpy(np.concatenate([mask, np.ones((2, 16), dtype=bool)], axis=1))
    expected = ref_denoise(ref, canvas, rcache, torch.from_numpy(sc), decoder_attention_mask=dmask)

    cache = model.make_cache()
    hidden = np.array(model.encode(mx.array(ids), cache, attention_mask=mx.array(mask)))
    assert err(hidden[mask], expected_h[mask]) < TOL  # pad rows are free to differ
    assert not np.isnan(hidden).any()
    logits = model.denoise(mx.array(canvas), cache, mx.array(sc))
    assert err(logits, expected) < TOL
    # the padded row equals the same prompt run alone, unpadded
    alone = model.make_cache()
    model.encode(mx.array(ids[1:, pads:]), alone)
    assert err(model.denoise(mx.array(canvas[1:]), alone, mx.array(sc[1:])), np.array(logits)[1:]) < TOL


def test_both_config_forms_give_the_same_model(tiny_mlx, copy_folder):
    folder, ref, model = tiny_mlx
    other = copy_folder(folder)
    rewrite_config_global_form(other)
    assert "per_layer_config" not in json.loads((other / "config.json").read_text())["text_config"]
    model2, _ = mlx_dgemma.load(other)
    assert model2.args.layer_head_dims == model.args.layer_head_dims == [16, 32, 16, 32]
    assert model2.args.layer_kv_heads == [2, 1, 2, 1]
    ids = mx.array([[2, 7, 9, 11]])
    canvas = mx.array(np.arange(16)[None] + 40)
    c1, c2 = model.make_cache(), model2.make_cache()
    model.encode(ids, c1)
    model2.encode(ids, c2)
    assert err(model.denoise(canvas, c1), model2.denoise(canvas, c2)) == 0.0


def test_global_head_dim_defaults_to_512():
    from mlx_dgemma.config import ModelArgs

    text = dict(model_type="diffusion_gemma_text", num_hidden_layers=6, num_experts=4, top_k_experts=2,
                moe_intermediate_size=8, num_key_value_heads=4)
    args = ModelArgs.from_dict(text)
    assert args.layer_head_dims == [256] * 5 + [512]
    assert args.layer_kv_heads == [4] * 6  # no num_global_key_value_heads: full layers keep num_key_value_heads
    args = ModelArgs.from_dict({**text, "num_global_key_value_heads": 2})
    assert args.layer_kv_heads == [4] * 5 + [2]
    assert args.layer_types == ["sliding_attention"] * 5 + ["full_attention"]


def test_converted_folder_gives_the_same_logits(tiny_mlx, tmp_path):
    folder, _, model = tiny_mlx
    out = mlx_dgemma.convert(str(folder), str(tmp_path / "mlx"), verbose=False)
    converted, _ = mlx_dgemma.load(out)
    ids = mx.array([[2, 17, 33, 4, 90]])
    canvas = mx.array(np.arange(16)[None] * 7)
    c1, c2 = model.make_cache(), converted.make_cache()
    model.encode(ids, c1)
    converted.encode(ids, c2)
    assert err(model.denoise(canvas, c1), converted.denoise(canvas, c2)) == 0.0


def test_proportional_rope_passes_unrotated_dims_through():
    """Only the first partial_rotary_factor * d/2 frequency pairs rotate; the rest keep cos=1, sin=0."""
    from mlx_dgemma.model import rope_frequencies

    d = 32
    base, periods = rope_frequencies(d, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6})
    assert base is None
    inv = 1 / np.array(periods)
    assert np.allclose(inv[:4], [1, 0.4217, 0.1778, 0.0750], atol=1e-4) and (inv[4:] == 0).all()
    x = mx.random.normal((1, 1, 5, d))
    y = mx.fast.rope(x, d, traditional=False, base=None, scale=1.0, offset=1000, freqs=periods)
    still = np.r_[4:16, 20:32]
    assert np.array_equal(np.array(x)[..., still], np.array(y)[..., still])
    assert not np.allclose(np.array(x)[..., :4], np.array(y)[..., :4])
