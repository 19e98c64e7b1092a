"""Training: the objective learns, its block-causal decoder view is exactly generation's view, runs reproduce and
resume from their seed, LoRA adapters apply / save / load / fuse, and bad data is reported clearly."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dgemma
from mlx_dgemma import demo
from mlx_dgemma import train as T
from mlx_dgemma.lora import LoRALinear, fuse_model, load_adapters, save_adapters, apply_lora
from mlx_dgemma.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_config(vocab_size, canvas=8, window=8):
    text = dict(
        model_type="diffusion_gemma_text", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=32, num_experts=4, top_k_experts=2, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, per_layer_config={"1": {"head_dim": 32, "num_key_value_heads": 1}}, sliding_window=window,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention="vision",
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return {"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny from-scratch model folder with the demo's character tokenizer."""
    out = tmp_path_factory.mktemp("tiny-train")
    for name in TOKENIZER_FILES:
        shutil.copy(demo.FOLDER / name, out / name)
    vocab = load_tokenizer(out).vocab_size
    (out / "config.json").write_text(json.dumps(tiny_config(vocab)))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def reverse_rows(n, seed, lo=2, hi=5):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice(list("abcd"), size=rng.integers(lo, hi + 1)))
        rows.append({"prompt": f"reverse {w}", "completion": w[::-1]})
    return rows


def examples(folder, rows, tmp_path, name="train.jsonl"):
    return T.load_examples(write_jsonl(tmp_path / name, rows), load_tokenizer(folder))


# --- the objective ---------------------------------------------------------------------------------------------


def test_short_run_learns_the_task(folder, tmp_path):
    train_set = examples(folder, reverse_rows(256, 0), tmp_path)
    valid_set = examples(folder, reverse_rows(32, 1), tmp_path, "valid.jsonl")
    model = T.build_model(folder, from_scratch=True, seed=0)
    cfg = T.TrainConfig(iters=200, batch_size=8, learning_rate=5e-3, warmup=5, seed=0, val_batches=4)
    before = T.evaluate(model, valid_set, cfg, pad_id=0, eos_id=1)
    losses = T.train(model, train_set, cfg, pad_id=0, eos_id=1, quiet=True)
    after = T.evaluate(model, valid_set, cfg, pad_id=0, eos_id=1)
    assert len(losses) == 200 and all(np.isfinite(losses))
    # Placing the EOS fill and guessing letters from {a, b, c, d} uniformly would score this; below it, the
    # model reads which letters the prompt holds and where they go.
    letters = np.mean([len(e.answer) for e in valid_set])
    guess = letters * np.log(4) / model.args.canvas_length
    assert after < 0.85 * guess < 0.2 * before, (before, after, guess)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])


def _inference_logits(model, prompt, clean_canvases, noisy, soft=None):
    """What generation computes for canvas k: the prompt and the k clean canvases encoded, then `denoise`."""
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    for c in clean_canvases:
        model.encode(mx.array([c]), cache)
    return model.denoise(mx.array([noisy]), cache, self_conditioning_probs=soft)


def test_block_causal_view_is_generations_view(folder):
    """All canvases trained at once (block-causal masks, sliding window, left padding) see exactly what
    generation's decoder sees for each canvas."""
    model = T.build_model(folder, from_scratch=True, seed=3)
    args = model.args
    C = args.canvas_length
    rng = np.random.default_rng(0)
    long = T.Example(prompt=rng.integers(5, 40, 5).tolist(), answer=rng.integers(5, 40, 2 * C + 3).tolist(), line=1)
    short = T.Example(prompt=rng.integers(5, 40, 9).tolist(), answer=rng.integers(5, 40, 3).tolist(), line=2)
    batch = T.make_batch([long, short], args, pad_id=0, eos_id=1)
    assert batch.canvases == 3 and batch.prompt_length == 9
    assert batch.canvas_weight[0].sum() == 3 * C and batch.canvas_weight[1].sum() == C
    assert batch.ar_weight[0].sum() == 2 * C and batch.ar_weight[1].sum() == 0
    noisy = rng.integers(0, args.vocab_size, batch.targets.shape).astype(np.int32)

    cache = T._training_cache(model)
    model.encode(mx.array(batch.encoder_ids), cache, attention_mask=mx.array(batch.encoder_mask))
    masks = {k: mx.array(v) for k, v in batch.decoder_masks.items()}
    trained = T.decode_canvases(model, mx.array(noisy), cache, batch.prompt_length, masks, None)

    targets = batch.targets[0]
    for k in range(3):
        clean = [targets[j * C : (j + 1) * C].tolist() for j in range(k)]
        expected = _inference_logits(model, long.prompt, clean, noisy[0, k * C : (k + 1) * C].tolist())
        got = trained[0, k * C : (k + 1) * C]
        assert float(mx.abs(got - expected[0]).max()) < 1e-4, k
    expected = _inference_logits(model, short.prompt, [], noisy[1, :C].tolist())
    assert float(mx.abs(trained[1, :C] - expected[0]).max()) < 1e-4


def test_loss_terms(folder):
    model = T.build_model(folder, from_scratch=True, seed=0)
    args = model.args
    one = T.Example([2, 5, 6], [10, 11, 12], 1)
    batch = T.make_batch([one], args, 0, 1)
    assert batch.targets.tolist() == [[10, 11, 12] + [1] * (args.canvas_length - 3)]  # EOS fill, supervised
    rng = np.random.default_rng(0)
    noise = T.draw_noise(rng, batch, args.vocab_size, args.canvas_length, 0.001, 0.5)
    loss, diffusion, ar = T.loss_terms(model, batch, noise)
    assert ar.item() == 0.0 and loss.item() == pytest.approx(diffusion.item())
    # Freshly initialised: close to a uniform guess over the vocabulary.
    assert abs(diffusion.item() - np.log(args.vocab_size)) < 0.5
    two = T.Example([2, 5, 6], list(range(10, 10 + args.canvas_length + 2)), 1)
    batch = T.make_batch([two], args, 0, 1)
    noise = T.draw_noise(rng, batch, args.vocab_size, args.canvas_length, 0.001, 0.5)
    loss, diffusion, ar = T.loss_terms(model, batch, noise)
    assert ar.item() > 0 and loss.item() == pytest.approx(diffusion.item() + ar.item(), rel=1e-5)


def test_seed_reproduces_and_resume_continues_exactly(folder, tmp_path):
    train_set = examples(folder, reverse_rows(64, 0), tmp_path)
    cfg = T.TrainConfig(iters=6, batch_size=8, learning_rate=1e-3, seed=7, save_every=3)
    runs = []
    for name in ("a", "b"):
        model = T.build_model(folder, from_scratch=True, seed=7)
        runs.append(T.train(model, train_set, cfg, pad_id=0, eos_id=1, save_path=tmp_path / name, quiet=True))
        final = dict(tree_flatten(model.parameters()))
    assert runs[0] == runs[1]
    # Resume run "a" from its step-3 checkpoint: steps 4-6 repeat exactly.
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_0000006", ignore_errors=True)
    model = T.build_model(folder, from_scratch=True, seed=7)
    resumed = T.train(model, train_set, cfg, pad_id=0, eos_id=1, save_path=tmp_path / "a", resume=True, quiet=True)
    assert resumed == runs[0][3:]
    for name, value in tree_flatten(model.parameters()):
        assert mx.array_equal(value, final[name]), name
    other = T.build_model(folder, from_scratch=True, seed=7)
    cfg2 = T.TrainConfig(iters=6, batch_size=8, learning_rate=1e-3, seed=8)
    assert T.train(other, train_set, cfg2, pad_id=0, eos_id=1, quiet=True) != runs[0]


def test_batches_group_similar_lengths_and_cover_the_data():
    lengths = np.random.default_rng(0).integers(10, 60, 100).tolist()
    seen, spread = [], []
    for step in range(25):  # one epoch: 5 groups of 5 batches of 4
        idx = T.batch_indices(lengths, 4, step, seed=1, group=5)
        assert len(idx) == 4
        seen += idx
        spread.append(max(lengths[i] for i in idx) - min(lengths[i] for i in idx))
    assert sorted(seen) == list(range(100))
    assert np.mean(spread) < 15  # random batches of 4 from 10..59 spread ~30
    assert T.batch_indices(lengths, 4, 3, 1, 5) == T.batch_indices(lengths, 4, 3, 1, 5)
    assert T.batch_indices(lengths, 4, 3, 1, 5) != T.batch_indices(lengths, 4, 3, 2, 5)


# --- the command line, full fine-tuning and LoRA ---------------------------------------------------------------


def test_cli_full_fine_tune_saves_a_loadable_model(folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", reverse_rows(32, 0))
    write_jsonl(data / "valid.jsonl", reverse_rows(8, 1))
    out = tmp_path / "trained"
    code = T.main(["--model", str(folder), "--data", str(data), "--from-scratch", "--fine-tune-type", "full",
                   "--iters", "4", "--batch-size", "4", "--save-path", str(out), "--steps-per-report", "2",
                   "--steps-per-eval", "4", "--val-batches", "1", "--save-every", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "tok/s" in printed and "val" in printed and "Trained 4 steps" in printed
    assert (out / "checkpoints" / "step_0000002" / "optimizer.safetensors").is_file()
    resumed = ["--model", str(folder), "--data", str(data), "--from-scratch", "--fine-tune-type", "full",
               "--batch-size", "4", "--save-path", str(out), "--resume", "--save-every", "2"]
    assert T.main([*resumed, "--iters", "3"]) == 0  # the last checkpoint is step 2: one step is left
    assert "Resuming" in (printed := capsys.readouterr().out) and "Trained 1 step in" in printed
    assert T.main([*resumed, "--iters", "2"]) == 0
    assert "Nothing to train" in capsys.readouterr().out
    model, tokenizer = mlx_dgemma.load(out)
    assert tokenizer is not None and model.args.canvas_length == 8
    ids = mlx_dgemma.generate_tokens(model, [tokenizer.apply_chat_template([{"role": "user", "content": "reverse ab"}])],
                                     seed=0, max_tokens=8, max_denoising_steps=2)
    assert len(ids[0]) >= 1


def test_lora_change_save_load_and_fuse(folder, tmp_path):
    base = T.build_model(folder, from_scratch=True, seed=0)
    base_folder = tmp_path / "base"
    T.save_model(base, folder, base_folder)
    model, _ = mlx_dgemma.load(base_folder)
    prompt = mx.array([[2, 5, 20, 21, 22]])
    canvas = mx.array([[30, 31, 32, 33, 34, 35, 36, 37]])

    def logits(m):
        cache = m.make_cache()
        m.encode(prompt, cache)
        return m.denoise(canvas, cache)

    before = logits(model)
    mx.random.seed(0)
    n = apply_lora(model, rank=4, scale=2.0)
    assert n == (4 + 3) + (3 + 3)  # q,k,v,o + MLP on the sliding layer; q,k,o (no v_proj) + MLP on the full one
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert not any("router" in k or "experts" in k for k in trainable)
    assert mx.allclose(logits(model), before, atol=1e-6)  # lora_b starts at zero

    # A few LoRA training steps move the output; the base weights stay untouched.
    train_set = examples(folder, reverse_rows(32, 0), tmp_path)
    base_weights = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    T.train(model, train_set, T.TrainConfig(iters=3, batch_size=8, learning_rate=1e-2), pad_id=0, eos_id=1, quiet=True)
    adapted = logits(model)
    assert float(mx.abs(adapted - before).max()) > 1e-3
    for k, v in tree_flatten(model.parameters()):
        if "lora" not in k:
            assert mx.array_equal(v, base_weights[k]), k

    save_adapters(model, tmp_path / "adapters", {"rank": 4, "scale": 2.0, "dropout": 0.0, "num_layers": -1})
    loaded, _ = mlx_dgemma.load(base_folder, adapter_path=tmp_path / "adapters")
    assert mx.allclose(logits(loaded), adapted, atol=1e-5)

    assert fuse_model(loaded) == n
    assert not any(isinstance(m, LoRALinear) for _, m in loaded.named_modules())
    assert mx.allclose(logits(loaded), adapted, atol=1e-4)


def test_lora_fuse_command_line(folder, tmp_path):
    """`python -m mlx_dgemma.lora` (the module is __main__ there, a second copy of itself) writes a fused model."""
    import subprocess
    import sys

    base = tmp_path / "base"
    T.save_model(T.build_model(folder, from_scratch=True, seed=0), folder, base)
    model, _ = mlx_dgemma.load(base)
    mx.random.seed(0)
    apply_lora(model, rank=2, scale=1.0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
    save_adapters(model, tmp_path / "adapters", {"rank": 2, "scale": 1.0, "dropout": 0.0, "num_layers": -1})
    run = subprocess.run([sys.executable, "-m", "mlx_dgemma.lora", "--model", str(base), "--adapter-path",
                          str(tmp_path / "adapters"), "--save-path", str(tmp_path / "fused")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    fused, _ = mlx_dgemma.load(tmp_path / "fused")
    prompt, canvas = mx.array([[2, 5, 20]]), mx.array([[30] * 8])

    def logits(m):
        cache = m.make_cache()
        m.encode(prompt, cache)
        return m.denoise(canvas, cache)

    assert float(mx.abs(logits(fused) - logits(model)).max()) < 1e-4


def test_lora_over_quantized_base_fuses(folder, tmp_path):
    model = T.build_model(folder, from_scratch=True, seed=0)
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    mx.random.seed(1)
    apply_lora(model, rank=2, scale=1.0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    prompt, canvas = mx.array([[2, 5, 20]]), mx.array([[30] * 8])

    def logits(m):
        cache = m.make_cache()
        m.encode(prompt, cache)
        return m.denoise(canvas, cache)

    adapted = logits(model)
    fuse_model(model)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert float(mx.abs(logits(model) - adapted).max()) < 0.05  # re-quantization error only (8-bit)


def test_lora_refuses_router_and_experts(folder):
    model = T.build_model(folder, from_scratch=True, seed=0)
    with pytest.raises(ValueError, match="router"):
        apply_lora(model, keys=["router.proj"])


def test_adapter_folder_errors(folder, tmp_path):
    model = T.build_model(folder, from_scratch=True, seed=0)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapters(model, tmp_path)


# --- bad input -------------------------------------------------------------------------------------------------


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "a", "completion": "b"},
        '{"prompt": "a", "completion": ',
        "",
        {"prompt": "a"},
        '["not", "an", "object"]',
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
        {"text": "plain"},
        {"prompt": "ok", "completion": "fine"},
    ])
    with pytest.raises(T.DataError) as e:
        T.read_jsonl(path)
    message = str(e.value)
    assert "5 malformed line(s)" in message and str(path) in message
    for line in ("line 2: not valid JSON", "line 4:", "line 5: expected a JSON object", "line 6:", "line 7:"):
        assert line in message
    assert "line 1:" not in message and "line 8:" not in message


def test_dataset_too_long_for_the_canvas_budget(folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = reverse_rows(6, 0) + [{"prompt": "reverse x", "completion": "y" * 40}]
    write_jsonl(data / "train.jsonl", rows)
    code = T.main(["--model", str(folder), "--data", str(data), "--from-scratch", "--fine-tune-type", "full",
                   "--iters", "1", "--max-canvases", "2", "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "1 of 7 examples do not fit the canvas budget" in err
    assert "line 7: answer 40 tokens (+ EOS) = 6 canvas(es)" in err
    assert "--max-canvases" in err


def test_chat_messages_are_rendered_with_the_template(folder, tmp_path):
    tokenizer = load_tokenizer(folder)
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "reverse ab"}, {"role": "assistant", "content": "ba"}]},
    ])
    (e,) = T.load_examples(path, tokenizer)
    assert e.prompt == tokenizer.apply_chat_template([{"role": "user", "content": "reverse ab"}])
    assert tokenizer.decode(e.answer) == "ba" and e.line == 1
    (p,) = T.load_examples(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "reverse ab", "completion": "ba"}]), tokenizer)
    assert p.prompt == e.prompt and p.answer == e.answer


def test_training_gelu_matches_the_reference_gelu(folder):
    x = mx.concatenate([mx.linspace(-12, 12, 20001), mx.random.normal((10000,)) * 3])
    assert float(mx.abs(T.gelu_tanh(x) - nn.gelu_approx(x)).max()) < 1e-6
    g1 = mx.grad(lambda v: (T.gelu_tanh(v) * mx.cos(v)).sum())(x)
    g2 = mx.grad(lambda v: (nn.gelu_approx(v) * mx.cos(v)).sum())(x)
    assert float(mx.abs(g1 - g2).max()) < 1e-5
    model = T.build_model(folder, from_scratch=True, seed=0)
    prompt, canvas = mx.array([[2, 5, 20, 21]]), mx.array([[30] * 8])

    def logits():
        cache = model.make_cache()
        model.encode(prompt, cache)
        return model.denoise(canvas, cache, self_conditioning_logits=mx.ones((1, 8, model.args.vocab_size)))

    exact = logits()
    with T.training_activations(model):
        assert type(model.layers[0].mlp).__name__ == "TrainingMLP"
        fast = logits()
    assert type(model.layers[0].mlp).__name__ == "MLP"
    assert float(mx.abs(fast - exact).max()) < 1e-4
