"""Token-exact generation against the reference's `generate()` when both consume the same random numbers.

torch's random stream cannot be reproduced in MLX, so the reference's draws are recorded (the initial canvas and,
each step, the categorical samples and the re-noising canvas) and replayed into our loop through a
`RandomSource`. With the same draws the two loops must produce the same tokens, stop at the same step and report
the same tokens per forward.
"""

from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import mlx_dgemma
from mlx_dgemma.diffusion import DiffusionStats, RandomSource, generate_tokens


class Replay(RandomSource):
    """Hands out the reference's recorded draws in the order it made them."""

    def __init__(self, randints, samples):
        self.randints, self.samples = list(randints), list(samples)

    def canvas(self, shape, vocab_size):
        return mx.array(self.randints.pop(0).numpy().astype(np.int32))

    noise = canvas

    def uniforms(self, shape):
        return mx.zeros(shape)

    def replace_sample(self, sample):
        return mx.array(self.samples.pop(0).numpy().reshape(sample.shape).astype(np.int32))


@contextmanager
def recording():
    randints, samples = [], []
    real_randint, real_multinomial = torch.randint, torch.multinomial

    def randint(*args, **kwargs):
        out = real_randint(*args, **kwargs)
        randints.append(out.clone())
        return out

    def multinomial(*args, **kwargs):
        out = real_multinomial(*args, **kwargs)
        samples.append(out.clone())
        return out

    torch.randint, torch.multinomial = randint, multinomial
    try:
        yield randints, samples
    finally:
        torch.randint, torch.multinomial = real_randint, real_multinomial


SCENARIOS = {
    "default": {},
    "always confident": dict(confidence_threshold=50.0),
    "stability 0": dict(stability_threshold=0, confidence_threshold=50.0),
    "large entropy bound": dict(entropy_bound=40.0),
    "many eos ids": dict(eos=list(range(1, 200))),
    "several canvases": dict(max_new_tokens=48),
}


_REFERENCE_RUNS = {}  # the reference's side of a case, shared by the backend profiles' runs of it


def run_reference(ref, prompts, settings, seed, decoder_input_ids, max_new, eos, bound):
    key = (repr(prompts), repr(sorted(settings.items())), seed, repr(decoder_input_ids), max_new, repr(eos), bound)
    if key in _REFERENCE_RUNS:
        return _REFERENCE_RUNS[key]
    length = max(map(len, prompts))
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    torch.manual_seed(seed)
    extra = {} if decoder_input_ids is None else {"decoder_input_ids": torch.as_tensor(decoder_input_ids)}
    with recording() as (randints, samples), torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                           sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(bound)), **settings, **extra)
    _REFERENCE_RUNS[key] = out, randints, samples, length
    return _REFERENCE_RUNS[key]


def run_both(folder, ref, model, prompts, settings, seed=0, decoder_input_ids=None):
    settings = dict(settings)
    max_new = settings.pop("max_new_tokens", 32)
    eos = settings.pop("eos", [1])
    bound = settings.pop("entropy_bound", 0.1)
    out, randints, samples, length = run_reference(ref, prompts, settings, seed, decoder_input_ids, max_new, eos,
                                                   bound)
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=eos)
    stats = DiffusionStats()
    ours = generate_tokens(model, prompts, max_tokens=max_new, entropy_bound=bound, rng=Replay(randints, samples),
                           stats=stats, initial_canvas=decoder_input_ids, **settings)
    expected = []
    for row in out.sequences[:, length:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        expected.append(row[: min(cut, max_new)])
    return ours, expected, stats, out


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model, _ = mlx_dgemma.load(tiny[0])
    return tiny[0], tiny[1], model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_token_exact_with_the_reference(tiny_model, scenario, batch, profile):
    folder, ref, model = tiny_model
    prompts = [[2, 10, 11, 12, 13, 14, 15, 16], [2, 40, 41]][:batch]
    ours, expected, stats, out = run_both(folder, ref, model, prompts, SCENARIOS[scenario])
    assert ours == expected
    assert np.allclose(stats.tokens_per_forward, out.tokens_per_forward.numpy())
    if scenario == "default":
        assert stats.steps == 8 * stats.canvases  # a random model never gets confident
    if scenario == "stability 0":
        assert stats.steps == stats.canvases  # one step per canvas
    if scenario == "many eos ids":
        assert all(row[-1] in range(1, 200) and len(row) <= 16 for row in ours), ours  # stopped in the first canvas
    if scenario == "several canvases":
        assert stats.canvases == 3


def test_warm_start_canvas_like_decoder_input_ids(tiny_model, profile):
    folder, ref, model = tiny_model
    start = np.arange(100, 116)[None]
    ours, expected, _, _ = run_both(folder, ref, model, [[2, 5, 6, 7]], {}, decoder_input_ids=start)
    assert ours == expected
