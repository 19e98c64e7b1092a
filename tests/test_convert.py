"""The converter: every reference tensor used once, dtypes, shards and index, and bad input refused cleanly."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlx_dgemma
from mlx_dgemma.model import checkpoint_name
from mlx_dgemma.weights import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_dgemma.convert", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def out_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update({t.name: t for t in read_safetensors_header(folder / name)})
    return index, tensors


def test_every_reference_tensor_used_exactly_once(tiny, tmp_path):
    folder, ref = tiny
    source = load_file(folder / "model.safetensors")
    out = mlx_dgemma.convert(str(folder), str(tmp_path / "mlx"), verbose=False)
    _, tensors = out_tensors(out)
    mapped = {name: checkpoint_name(name) for name in source}
    assert all(v is not None for v in mapped.values())  # save_pretrained writes no tied copies
    assert sorted(mapped.values()) == sorted(tensors)  # one output per source tensor, none invented
    assert len(set(mapped.values())) == len(source) == 112
    # values are carried over unchanged (float32 in, float32 out), vision included
    converted = mx.load(str(out / "model.safetensors"))
    for name, value in source.items():
        assert np.array_equal(np.array(converted[mapped[name]]), value.numpy()), name
    # the layer scalars of the two passes stay separate tensors
    assert "layers.0.encoder_layer_scalar" in tensors and "layers.0.layer_scalar" in tensors
    for f in ("config.json", "generation_config.json", "README.md"):
        assert (out / f).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and "vision_config" in config


@pytest.mark.parametrize("dtype,code", [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_dtype_option(tiny, tmp_path, dtype, code):
    out = mlx_dgemma.convert(str(tiny[0]), str(tmp_path / dtype), dtype=dtype, verbose=False)
    _, tensors = out_tensors(out)
    assert {t.dtype for t in tensors.values()} == {code}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    model, _ = mlx_dgemma.load(out)
    assert model.embed_tokens.weight.dtype == getattr(mx, dtype)
    # Half-precision folders run everywhere, MLX's CPU backend included (its gathered matmul is float32-only),
    # and compute what the float32 model computes up to their rounding. A random tiny MoE is chaotic (rounding
    # flips some routing), so the whole logit field is compared, not its largest difference.
    full, _ = mlx_dgemma.load(tiny[0])
    cache, full_cache = model.make_cache(), full.make_cache()
    prompt = mx.array([[2, 10, 11, 12, 13]])
    model.encode(prompt, cache)
    full.encode(prompt, full_cache)
    canvas = mx.array([list(range(20, 20 + model.args.canvas_length))])
    logits, reference = model.denoise(canvas, cache), full.denoise(canvas, full_cache)
    a, b = np.array(logits).ravel(), np.array(reference).ravel()
    assert logits.dtype == mx.float32 and np.corrcoef(a, b)[0, 1] > 0.95
    assert len(mlx_dgemma.generate_tokens(model, [[2, 10, 11]], max_tokens=8, seed=0)[0]) <= 8


def test_shards_and_index(tiny, tmp_path):
    out = mlx_dgemma.convert(str(tiny[0]), str(tmp_path / "sharded"), max_shard_size=200_000, verbose=False)
    index, tensors = out_tensors(out)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    for name in files:
        # a shard exceeds the cap only when it holds a single tensor bigger than the cap
        headers = read_safetensors_header(out / name)
        assert sum(t.nbytes for t in headers) <= 200_000 or len(headers) == 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    ref_model, _ = mlx_dgemma.load(tiny[0])
    model, _ = mlx_dgemma.load(out)
    ids, canvas = mx.array([[2, 5, 6]]), mx.array([list(range(16))])
    c1, c2 = ref_model.make_cache(), model.make_cache()
    ref_model.encode(ids, c1)
    model.encode(ids, c2)
    assert np.array_equal(np.array(ref_model.denoise(canvas, c1)), np.array(model.denoise(canvas, c2)))


def test_sharded_hf_source_and_pytorch_pickle_source(tiny, tmp_path):
    folder, _ = tiny
    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    # a sharded safetensors source with an index, like the released checkpoint
    sharded = tmp_path / "hf-sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, sharded / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # a PyTorch pickle source
    pickled = tmp_path / "hf-bin"
    pickled.mkdir()
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]  # without a recorded dtype, the tensors' own dtype is kept
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save({n: weights[n].to(torch.bfloat16) for n in names}, pickled / "pytorch_model.bin")

    a = mlx_dgemma.convert(str(sharded), str(tmp_path / "a"), verbose=False)
    b = mlx_dgemma.convert(str(pickled), str(tmp_path / "b"), verbose=False)
    ta, tb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    assert {v.dtype for v in tb.values()} == {mx.bfloat16}  
    for name in ta:
        assert np.array_equal(np.array(ta[name].astype(mx.bfloat16).astype(mx.float32)), np.array(tb[name].astype(mx.float32)))


def test_pickle_without_torch_is_a_clear_error(tiny, tmp_path):
    folder, _ = tiny
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mlx_dgemma.convert import main\n"
        f"sys.exit(main(['--hf-path', {str(src)!r}, '--mlx-path', {str(tmp_path / 'out')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    assert "pytorch_model.bin" in r.stderr and "needs torch" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_refuses_an_existing_folder(tiny, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("--hf-path", tiny[0], "--mlx-path", out, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "[INFO] Using dtype: bfloat16" in r.stdout
    assert (out / "model.safetensors").is_file()
    r = run_cli("--hf-path", tiny[0], "--mlx-path", out)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (out / "model.safetensors").is_file()  # untouched


def _break(folder, how):
    weights = folder / "model.safetensors"
    if how == "missing config":
        (folder / "config.json").unlink()
        return "config.json"
    if how == "missing shard":
        weights.unlink()
        return "no weights found"
    if how == "truncated shard":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "truncated"
    if how == "index names a missing file":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
        return "model-00002-of-00002.safetensors"
    if how == "unknown model_type":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(config))
        return "'llama'"
    tensors = load_file(weights)
    key = "model.decoder.layers.1.self_attn.q_proj.weight"
    if how == "wrong shape":
        tensors[key] = torch.zeros(3, 3)
        message = key
    elif how == "missing key":
        del tensors[key]
        message = "layers.1.self_attn.q_proj.weight"
    elif how == "unexpected key":
        tensors["model.decoder.layers.1.self_attn.extra.weight"] = torch.zeros(3)
        message = "model.decoder.layers.1.self_attn.extra.weight"
    save_file(tensors, weights, metadata={"format": "pt"})
    return message


BAD = ["missing config", "missing shard", "truncated shard", "index names a missing file", "unknown model_type",
       "wrong shape", "missing key", "unexpected key"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_is_refused_cleanly(tiny, copy_folder, tmp_path, how):
    src = copy_folder(tiny[0], "src")
    message = _break(src, how)
    out = tmp_path / "out"
    r = run_cli("--hf-path", src, "--mlx-path", out)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert message in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no partial folder left
    with pytest.raises(ValueError, match=re.escape(message)):  # load() gives the same error
        mlx_dgemma.load(src)


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    from mlx_dgemma import convert as convert_module

    calls = {"n": 0}
    original = convert_module.Entry.write

    def failing_write(self, writer):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(self, writer)

    monkeypatch.setattr(convert_module.Entry, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        mlx_dgemma.convert(str(tiny[0]), str(tmp_path / "out"), verbose=False)
    assert list(tmp_path.iterdir()) == []
