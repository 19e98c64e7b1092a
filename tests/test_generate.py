"""The generation APIs and command line: determinism, budgets, streaming, warm start, lazy evaluation, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_dgemma
from mlx_dgemma import diffusion as diffusion_module
from mlx_dgemma.diffusion import DiffusionStats, generate_tokens
from mlx_dgemma.text_generation import stream_generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tiny_chat_folder):
    """The tiny reference checkpoint with a word-level tokenizer, loaded."""
    model, tokenizer = mlx_dgemma.load(tiny_chat_folder)
    return tiny_chat_folder, model, tokenizer


@pytest.fixture(autouse=True)
def fresh_defaults(chat_model):
    """Tests adjust the sampler defaults of the shared model; each starts from the checkpoint's."""
    model = chat_model[1]
    saved = model.sampler_defaults
    yield
    model.sampler_defaults = saved


def test_seeded_generation_is_deterministic(chat_model):
    _, model, _ = chat_model
    prompts = [[2, 10, 11, 12]]
    a = generate_tokens(model, prompts, max_tokens=32, seed=7)
    b = generate_tokens(model, prompts, max_tokens=32, seed=7)
    c = generate_tokens(model, prompts, max_tokens=32, seed=8)
    d, e = generate_tokens(model, prompts, max_tokens=32), generate_tokens(model, prompts, max_tokens=32)
    assert a == b
    assert a != c
    assert d != e  # no seed: fresh noise


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 20, 33])
def test_max_tokens_is_never_exceeded(chat_model, max_tokens):
    _, model, _ = chat_model
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[1])
    stats = DiffusionStats()
    rows = generate_tokens(model, [[2, 10], [2, 30, 31, 32]], max_tokens=max_tokens, seed=0, stats=stats)
    assert all(len(r) <= max_tokens for r in rows)
    assert stats.canvases <= -(-max_tokens // 16)
    for r in rows:
        assert len(r) == max_tokens or r[-1] == 1  # cut by the budget, or ended by EOS


def test_batch_rows_match_single_runs_with_the_same_draws(chat_model):
    """A padded batch gives each row what it would get alone, when the same random numbers reach each row."""
    _, model, _ = chat_model
    prompts = [[2, 10, 11, 12, 13, 14], [2, 40, 41]]
    draws = {}

    class Fixed(diffusion_module.RandomSource):
        def __init__(self, rows):
            self.rows, self.n = rows, 0

        def _take(self, kind, shape, vocab=None):
            key = (kind, self.n)
            self.n += 1
            if key not in draws:
                draws[key] = np.array(mx.random.randint(0, 512, (2, shape[1]), key=mx.random.key(self.n)))
            return mx.array(draws[key][self.rows])

        def canvas(self, shape, vocab):
            return self._take("c", shape)

        noise = canvas

        def uniforms(self, shape):
            return mx.array(np.linspace(0.05, 0.95, shape[1], dtype=np.float32))[None].astype(mx.float32) * mx.ones(shape)

    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[], stability_threshold=0,
                                                            confidence_threshold=50.0)
    together = generate_tokens(model, prompts, max_tokens=16, rng=Fixed([0, 1]))
    alone = [generate_tokens(model, [p], max_tokens=16, rng=Fixed([i]))[0] for i, p in enumerate(prompts)]
    assert together == alone


def test_stream_generate_reports_drafts_and_commits(chat_model):
    _, model, tokenizer = chat_model
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[1])
    responses = list(stream_generate(model, tokenizer, "why is the sky blue", max_tokens=40, drafts=True, seed=3))
    drafts = [r for r in responses if r.is_draft]
    commits = [r for r in responses if not r.is_draft]
    assert len(commits) == 3 and [c.canvas_index for c in commits] == [0, 1, 2]
    assert [d.step for d in drafts if d.canvas_index == 0] == list(range(1, 9))
    assert all(isinstance(d.draft_text, str) and d.text == "" for d in drafts)
    last = commits[-1]
    assert last.finish_reason == "length" and all(c.finish_reason is None for c in commits[:-1])
    assert last.generation_tokens == sum(len(c.tokens) for c in commits) == 40
    assert last.prompt_tokens == len(tokenizer.apply_chat_template([{"role": "user", "content": "why is the sky blue"}]))
    assert last.denoising_steps == 24 and last.canvases == 3
    assert last.tokens_per_forward == pytest.approx(48 / 24)  # three whole canvases over 24 passes
    assert last.peak_memory > 0 and last.generation_tps > 0 and last.prompt_tps > 0
    text = "".join(c.text for c in commits)
    assert text == tokenizer.decode([t for c in commits for t in c.tokens])


def test_stop_reason_and_text_api(chat_model):
    _, model, tokenizer = chat_model
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=list(range(1, 300)))
    responses = list(stream_generate(model, tokenizer, [2, 5, 11, 6, 5, 11], max_tokens=64, seed=0))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].tokens[-1] in range(1, 300)
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[1])
    text = mlx_dgemma.generate(model, tokenizer, "hello", max_tokens=16, seed=1)
    again = mlx_dgemma.generate(model, tokenizer, "hello", max_tokens=16, seed=1)
    assert isinstance(text, str) and text == again


def test_warm_start_from_text_or_ids(chat_model):
    """A draft (ids or text) replaces the first canvas's noise: the same draft gives the same result, and a
    different one than starting from noise."""
    _, model, tokenizer = chat_model
    draft = "the sky is blue"
    ids = tokenizer.encode(draft, add_special_tokens=False)
    a = generate_tokens(model, [[2, 10, 11]], max_tokens=16, seed=0, initial_canvas=ids)
    b = generate_tokens(model, [[2, 10, 11]], max_tokens=16, seed=0, initial_canvas=ids)
    c = generate_tokens(model, [[2, 10, 11]], max_tokens=16, seed=0)
    assert a == b and a != c
    text = list(stream_generate(model, tokenizer, [2, 10, 11], max_tokens=16, seed=0, initial_canvas=draft))
    assert text[-1].tokens == a[0]
    with pytest.raises(ValueError, match="canvas holds 16"):
        generate_tokens(model, [[2, 10]], initial_canvas=list(range(20)))


@pytest.mark.parametrize("count", [1, 3])
def test_lanes_change_nothing_but_speed(chat_model, monkeypatch, count):
    """The sampler's positions split over CPU streams (cpu.lanes) give the tokens and logits of one stream."""
    from mlx_dgemma import cpu

    _, model, _ = chat_model
    prompts = [[2, 10, 11, 12], [2, 30]]
    cache = model.make_cache()
    model.encode(mx.array([[2, 10, 11, 12]]), cache)
    canvas = mx.array([list(range(5, 5 + model.args.canvas_length))])
    single = generate_tokens(model, prompts, max_tokens=40, seed=3), model.denoise(canvas, cache)
    lanes = [mx.new_stream(mx.cpu) for _ in range(count)] if mx.default_device() == mx.cpu else [None] * count
    monkeypatch.setattr(cpu, "lanes", lambda: lanes)
    split = generate_tokens(model, prompts, max_tokens=40, seed=3), model.denoise(canvas, cache)
    assert split[0] == single[0]
    assert mx.abs(split[1] - single[1]).max().item() == 0.0


def test_lane_slices_cover_the_positions_once():
    from mlx_dgemma.cpu import lane_slices

    for n, count in [(256, 2), (7, 3), (2, 5), (16, 1)]:
        slices = lane_slices(n, count)
        assert [i for s in slices for i in range(n)[s]] == list(range(n))
        assert len(slices) == min(n, count) and max(s.stop - s.start for s in slices) - min(
            s.stop - s.start for s in slices) <= 1


def test_one_evaluation_and_one_host_read_per_step(chat_model, monkeypatch):
    _, model, _ = chat_model
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[])
    counts = {"eval": 0, "host": 0}
    real_eval, real_host = mx.eval, diffusion_module._to_host

    def counting_eval(*args):
        counts["eval"] += 1
        return real_eval(*args)

    def counting_host(*args):
        counts["host"] += 1
        return real_host(*args)

    monkeypatch.setattr(mx, "eval", counting_eval)
    monkeypatch.setattr(diffusion_module, "_to_host", counting_host)
    stats = DiffusionStats()
    generate_tokens(model, [[2] + list(range(10, 40))], max_tokens=48, seed=0, prefill_step_size=8, stats=stats)
    prefill_chunks, encoded_canvases = 4, stats.canvases - 1
    assert stats.steps == 24
    assert counts["host"] == stats.steps  # the stop check, once per step
    assert counts["eval"] == stats.steps + prefill_chunks + encoded_canvases


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_dgemma.generate", *map(str, args)], capture_output=True,
                          text=True, env=env, input=stdin, timeout=300)


def test_cli_end_to_end(chat_model):
    folder = chat_model[0]
    r = run_cli("--model", folder, "-p", "why is the sky blue", "--seed", "0", "-m", "20", "--steps", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "=========="
    for prefix in ("Prompt: ", "Generation: ", "Peak memory: ", "Diffusion: "):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert "Diffusion: 2 canvases, 8 steps" in r.stdout
    assert "tokens-per-sec" in r.stdout and "tokens/forward" in r.stdout
    tokens = int(next(line for line in lines if line.startswith("Generation: ")).split()[1])
    assert f"tokens/forward, {2 * 4 * 16 / tokens:.1f} visits/token" in r.stdout  # 8 passes over 16 positions
    fast = run_cli("--model", folder, "-p", "why is the sky blue", "--seed", "0", "-m", "20", "--sampler", "fast")
    assert fast.returncode == 0, fast.stderr
    assert "visits/token" in fast.stdout
    quiet = run_cli("--model", folder, "-p", "-", "--seed", "0", "-m", "20", "--steps", "4", "--verbose", "false",
                    stdin="why is the sky blue")
    assert quiet.returncode == 0 and "Prompt:" not in quiet.stdout
    assert quiet.stdout.strip() == lines[1].strip()  # same seed, same text; stdin prompt


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps"),
    (["--t-min", "0.9", "--t-max", "0.5"], "--t-max"),
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--entropy-bound", "-1"], "--entropy-bound"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "many"], "--steps"),
    (["--sampler", "quick"], "--sampler"),
])
def test_cli_bad_values_get_one_line(chat_model, flags, message):
    r = run_cli("--model", chat_model[0], "-p", "hi", *flags)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_model_is_named(tmp_path):
    r = run_cli("--model", tmp_path / "nope", "-p", "hi")
    assert r.returncode == 1 and str(tmp_path / "nope") in r.stderr and len(r.stderr.strip().splitlines()) == 1
