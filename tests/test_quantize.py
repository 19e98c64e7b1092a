"""Quantized conversion: agreement with float32, the mixed recipe, loading and generating, `--dequantize`, size
estimates (including the released model's dimensions) and bad quantization flags.

About the agreement figures. A randomly initialised MoE stack is chaotic: on the reference checkpoint used here,
Gaussian weight noise of 0.05% of each tensor's spread already changes about 9% of the top-1 tokens, because
near-tied router logits flip expert choices and the output distribution is almost flat. Top-1 agreement on such
a model measures its chaos, not the quantizer. So the tests check three things:

* the quantized runtime computes exactly what float32 computes with the dequantized weights (no error of its own);
* on the plain random checkpoint, quantization costs no more than Gaussian noise of the same RMS per tensor;
* on a better-conditioned copy (embedding 10x, residual-branch norms 0.5x: a residual stream dominated by the
  token embedding and confident predictions, as in trained models) 8-bit keeps top-1 agreement >= 99%.

Top-1 agreement and KL(float32 || quantized) are printed for all of them (`pytest -s` shows them).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_dgemma.switch import QuantizedExpertLinear
from safetensors.torch import load_file, save_file

import mlx_dgemma
from mlx_dgemma.convert import estimate, main as convert_main
from mlx_dgemma.weights import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
GROUP = 64
# Every quantized matrix of this checkpoint has a last dimension divisible by 64 (hidden 128, heads x head_dim
# 64 or 128, dense width 256, expert width 64, vocabulary 1024).
QUANT_REF = dict(name="quant", hidden_size=128, intermediate_size=256, moe_intermediate_size=64, vocab_size=1024,
                 num_experts=8)
EIGHT_BIT_KINDS = ("embed_tokens", "self_attn.", "mlp.", "router.proj", "self_conditioning.")


# --- fixtures ----------------------------------------------------------------------------------------------------


def conditioned_copy(folder: Path, out: Path) -> Path:
    """The reference checkpoint with the embedding 10x and the residual-branch norms 0.5x (see the docstring)."""
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, out / f.name)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if name.endswith("embed_tokens.weight"):
            tensors[name] = tensors[name] * 10
        elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            tensors[name] = tensors[name] * 0.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def folders(reference_factory, tmp_path_factory):
    """float32, 8-bit and mixed 4-bit conversions of the plain and the conditioned reference checkpoints."""
    source, _ = reference_factory(**QUANT_REF)
    root = tmp_path_factory.mktemp("quant")
    sources = {"plain": source, "conditioned": conditioned_copy(source, root / "conditioned-hf")}
    out = {}
    for kind, src in sources.items():
        out[kind, "fp32"] = mlx_dgemma.convert(str(src), str(root / f"{kind}-fp32"), verbose=False)
        out[kind, "q8"] = mlx_dgemma.convert(str(src), str(root / f"{kind}-q8"), quantize=True, q_bits=8,
                                             q_group_size=GROUP, verbose=False)
        out[kind, "q4"] = mlx_dgemma.convert(str(src), str(root / f"{kind}-q4"), quantize=True, q_bits=4,
                                             q_group_size=GROUP, verbose=False)
    out["source"] = source
    return out


# --- helpers -----------------------------------------------------------------------------------------------------


def logits(model) -> np.ndarray:
    """Decoder logits `[N, V]` for fixed prompts and canvases: one plain and one self-conditioned step."""
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(3, 1000, (8, 24)))
    canvas = mx.array(rng.integers(3, 1000, (8, 16)))
    cache = model.make_cache()
    model.encode(ids, cache)
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, first)
    out = mx.concatenate([first, second], axis=1).astype(mx.float32)
    return np.array(out).reshape(-1, out.shape[-1]).astype(np.float64)


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other)) over all positions."""
    lp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float((reference.argmax(-1) == other.argmax(-1)).mean()), float(kl.mean())


def dequantized(module) -> mx.array:
    return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=module.mode)


def quantized_modules(model) -> dict:
    return {path: m for path, m in model.named_modules() if "scales" in m}


def with_matched_noise(float_model, quantized_model, seed=0):
    """float32 weights plus Gaussian noise whose RMS equals each tensor's quantization error."""
    mx.random.seed(seed)
    noisy = dict(tree_flatten(float_model.parameters()))
    for path, m in quantized_modules(quantized_model).items():
        w = noisy[f"{path}.weight"]
        rms = mx.sqrt(mx.mean(mx.square(dequantized(m) - w)))
        noisy[f"{path}.weight"] = w + rms * mx.random.normal(w.shape)
    float_model.update(tree_unflatten(list(noisy.items())))
    return float_model


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_dgemma.convert", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


# --- agreement ---------------------------------------------------------------------------------------------------


def test_quantized_runtime_equals_float_with_dequantized_weights(folders):
    """The quantized kernels (quantized_matmul, gather_qmm, quantized embedding and soft embedding) add no error."""
    quantized, _ = mlx_dgemma.load(folders["plain", "q4"])
    reference, _ = mlx_dgemma.load(folders["plain", "fp32"])
    params = dict(tree_flatten(reference.parameters()))
    for path, m in quantized_modules(quantized).items():
        params[f"{path}.weight"] = dequantized(m)
    reference.update(tree_unflatten(list(params.items())))
    a, b = logits(quantized), logits(reference)
    assert np.abs(a - b).max() < 1e-4


def test_agreement_with_float32(folders):
    rows = []
    for kind in ("plain", "conditioned"):
        base_model, _ = mlx_dgemma.load(folders[kind, "fp32"])
        base = logits(base_model)
        for name in ("q8", "q4"):
            model, _ = mlx_dgemma.load(folders[kind, name])
            top1, kl = agreement(base, logits(model))
            noise_model = with_matched_noise(mlx_dgemma.load(folders[kind, "fp32"])[0], model)
            noise_top1, noise_kl = agreement(base, logits(noise_model))
            rows.append((kind, name, top1, kl, noise_top1, noise_kl))
    print(f"\n{'checkpoint':<12} {'weights':<11} {'top-1':>7} {'KL':>10}   {'matched noise: top-1':>20} {'KL':>10}")
    for kind, name, top1, kl, noise_top1, noise_kl in rows:
        label = {"q8": "8-bit", "q4": "4-bit mixed"}[name]
        print(f"{kind:<12} {label:<11} {top1:7.2%} {kl:10.2e}   {noise_top1:20.2%} {noise_kl:10.2e}")
    result = {(kind, name): (top1, kl, noise_kl) for kind, name, top1, kl, _, noise_kl in rows}
    # conditioned checkpoint: the bar
    assert result["conditioned", "q8"][0] >= 0.99
    assert result["conditioned", "q4"][0] >= 0.95
    for key, (top1, kl, noise_kl) in result.items():
        # no worse than unbiased noise of the same size (a packing, layout or scale bug is far worse)
        assert kl <= 2.5 * noise_kl, key
    # and 4-bit experts cost more than 8-bit ones, but stay close
    for kind in ("plain", "conditioned"):
        assert result[kind, "q8"][1] < result[kind, "q4"][1] < 10 * result[kind, "q8"][1]


# --- the mixed recipe, loading, generating -----------------------------------------------------------------------


def test_mixed_recipe_keeps_eight_bit_modules(folders):
    folder = folders["plain", "q4"]
    config = json.loads((folder / "config.json").read_text())
    block = config["quantization"]
    assert {k: block[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": GROUP, "mode": "affine"}
    assert config["quantization_config"] == block
    overrides = {k: v for k, v in block.items() if isinstance(v, dict)}

    model, _ = mlx_dgemma.load(folder)
    modules = quantized_modules(model)
    eight = {p for p in modules if any(k in p for k in EIGHT_BIT_KINDS)}
    experts = {p for p in modules if ".experts." in p}
    assert eight | experts == set(modules) and not eight & experts
    # embedding, self-conditioning 3, per layer: attention 4 (sliding) or 3 (full: no v_proj), MLP 3, router 1
    assert len(experts) == 2 * 4 and len(eight) == 1 + 3 + (4 + 3 + 4 + 3) + 4 * 3 + 4
    # config block: exactly the 8-bit modules are overridden, the experts follow the global 4-bit settings
    assert set(overrides) == eight
    assert all(v == {"bits": 8, "group_size": GROUP, "mode": "affine"} for v in overrides.values())
    for path in eight:
        assert modules[path].bits == 8 and modules[path].group_size == GROUP, path
    for path in experts:
        assert isinstance(modules[path], QuantizedExpertLinear) and modules[path].bits == 4, path
    assert isinstance(model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # norms and scalars stay float; fused experts are quantized per expert and row
    assert model.layers[0].router.scale.dtype == mx.float32
    headers = {t.name: t for t in read_safetensors_header(folder / "model.safetensors")}
    gate_up = headers["layers.0.experts.gate_up_proj.weight"]
    assert gate_up.dtype == "U32" and gate_up.shape == (8, 128, 128 * 4 // 32)
    assert headers["layers.0.experts.gate_up_proj.scales"].shape == (8, 128, 128 // GROUP)
    assert headers["layers.0.experts.down_proj.scales"].shape == (8, 128, 64 // GROUP)
    assert all(t.dtype == "F32" for n, t in headers.items() if n.startswith("vision_tower."))


def test_quantized_folder_generates_with_gathered_expert_matmuls(folders, monkeypatch):
    model, _ = mlx_dgemma.load(folders["plain", "q4"])
    calls = {"gather_qmm": 0, "gather_mm": 0, "dequantized": 0}
    gather_qmm, gather_mm, dequantize = mx.gather_qmm, mx.gather_mm, mx.dequantize

    def counting_gather_qmm(*args, **kwargs):
        calls["gather_qmm"] += 1
        return gather_qmm(*args, **kwargs)

    def counting_gather_mm(*args, **kwargs):
        calls["gather_mm"] += 1
        return gather_mm(*args, **kwargs)

    def counting_dequantize(w, *args, **kwargs):
        out = dequantize(w, *args, **kwargs)
        calls["dequantized"] = max(calls["dequantized"], out.shape[-2] if out.ndim > 1 else 1)
        return out

    monkeypatch.setattr(mx, "gather_qmm", counting_gather_qmm)
    monkeypatch.setattr(mx, "gather_mm", counting_gather_mm)
    monkeypatch.setattr(mx, "dequantize", counting_dequantize)
    tokens = mlx_dgemma.generate_tokens(model, [[2, 5, 6]], max_tokens=16, seed=0)
    assert len(tokens) == 1 and 0 < len(tokens[0]) <= 16
    assert all(isinstance(t, int) and 0 <= t < 1024 for t in tokens[0])
    assert calls["gather_qmm"] > 0 and calls["gather_mm"] == 0
    # only embedding rows of the tokens at hand are ever dequantized (a canvas is 16 tokens), never a matrix
    assert calls["dequantized"] <= 16


def test_mxfp4_mode(tiny, tmp_path):
    out = mlx_dgemma.convert(str(tiny[0]), str(tmp_path / "mxfp4"), quantize=True, q_mode="mxfp4", verbose=False)
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: block[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    assert block["embed_tokens"] == {"bits": 8, "group_size": 32, "mode": "mxfp8"}
    model, _ = mlx_dgemma.load(out)
    assert model.layers[0].experts.down_proj.mode == "mxfp4" and model.layers[0].mlp.up_proj.mode == "mxfp8"
    tokens = mlx_dgemma.generate_tokens(model, [[2, 5, 6]], max_tokens=16, seed=0)
    assert 0 < len(tokens[0]) <= 16


# --- dequantize round trip ---------------------------------------------------------------------------------------


def test_dequantize_round_trip(folders, tmp_path):
    q4 = folders["plain", "q4"]
    back = mlx_dgemma.convert(str(q4), str(tmp_path / "back"), dequantize=True, verbose=False)
    config = json.loads((back / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config and config["dtype"] == "float32"
    # float tensors again, exactly the dequantized values, the same names as a plain conversion
    plain = mx.load(str(folders["plain", "fp32"] / "model.safetensors"))
    floats = mx.load(str(back / "model.safetensors"))
    assert sorted(floats) == sorted(plain) and all(v.dtype == mx.float32 for v in floats.values())
    model, _ = mlx_dgemma.load(q4)
    modules = quantized_modules(model)
    for path, m in modules.items():
        assert mx.array_equal(floats[f"{path}.weight"], dequantized(m)), path
    float_model, _ = mlx_dgemma.load(back)
    assert not quantized_modules(float_model)
    assert np.abs(logits(float_model) - logits(model)).max() < 1e-4

    # ... and quantized again with the same settings: the same layout and config, within one step of each weight
    again = mlx_dgemma.convert(str(back), str(tmp_path / "again"), quantize=True, q_bits=4, q_group_size=GROUP,
                               verbose=False)
    assert json.loads((again / "config.json").read_text())["quantization"] == json.loads((q4 / "config.json").read_text())["quantization"]
    assert (again / "model.safetensors").stat().st_size == (q4 / "model.safetensors").stat().st_size
    requantized = quantized_modules(mlx_dgemma.load(again)[0])
    for path, m in modules.items():
        step = mx.repeat(mx.abs(m.scales), m.group_size, axis=-1)
        assert mx.all(mx.abs(dequantized(requantized[path]) - dequantized(m)) <= step * 1.001 + 1e-7), path

    # a quantized folder converted without -q/-d (other shards, say) keeps its packed tensors bit for bit
    copy = mlx_dgemma.convert(str(q4), str(tmp_path / "copy"), max_shard_size=300_000, verbose=False)
    original = mx.load(str(q4 / "model.safetensors"))
    copied = {}
    for f in copy.glob("*.safetensors"):
        copied.update(mx.load(str(f)))
    assert sorted(copied) == sorted(original)
    assert all(mx.array_equal(copied[k], v) and copied[k].dtype == v.dtype for k, v in original.items())


# --- size estimates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp32", "q8", "q4"])
def test_dry_run_estimate_matches_converted_size(folders, name):
    flags = {"fp32": {}, "q8": dict(quantize=True, q_bits=8, q_group_size=GROUP),
             "q4": dict(quantize=True, q_bits=4, q_group_size=GROUP)}[name]
    rows, plan = estimate(str(folders["source"]), **flags)
    estimated = sum(r[1] for r in rows)
    folder = folders["plain", name]
    real = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert estimated == index["metadata"]["total_size"]  # tensor bytes: exact (vision included)
    assert abs(real - estimated) / real < 0.02  # files, headers included
    # a converted folder's own config sizes it as it is
    rows, _ = estimate(str(folder))
    assert sum(r[1] for r in rows) == estimated


def released_config() -> dict:
    """google/diffusiongemma-26B-A4B-it's config.json dimensions (text model: 30 layers, 5:1 sliding/full with
    full layers at 5, 11, ..., 29; 128 experts of width 704, top 8; vision tower: hidden 1152, 27 layers)."""
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)]
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma", "dtype": "bfloat16",
        "canvas_length": 256, "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": 262144, "hidden_size": 2816,
            "intermediate_size": 2112, "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": 2,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
            "attention_bias": False, "sliding_window": 1024, "layer_types": layer_types,
            "final_logit_softcapping": 30.0, "use_bidirectional_attention": "vision", "num_experts": 128,
            "top_k_experts": 8, "moe_intermediate_size": 704,
        },
        # SigLIP-so400m-sized tower (27 layers of width 1152, MLP 4304, 16 heads of 72); 355 tensors with
        # standardize and no clipped linears.
        "vision_config": {
            "model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
            "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "patch_size": 16,
            "pooling_kernel_size": 3, "position_embedding_size": 10240, "standardize": True,
            "use_clipped_linears": False,
        },
    }


def test_released_model_dry_run_fits_17_gb(tmp_path):
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(released_config(), indent=1))
    result = run_cli("--dry-run", "--hf-path", folder, "-q")
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    lines = result.stdout.strip().splitlines()
    total = lines[-1]
    assert total.startswith("Total: ") and total.endswith(" bits per weight)")
    gigabytes = float(total.split()[1])
    assert gigabytes <= 17.0
    table = {line.split("  ")[0].strip(): line for line in lines[:-1]}
    assert {"experts", "attention", "embeddings (and tied LM head)", "vision"} <= set(table)
    # only config.json was read (there is nothing else in the folder) and nothing was written
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]

    _, plan = estimate(str(folder), quantize=True)
    assert abs(sum(e.nbytes for e in plan.entries) / 1e9 - gigabytes) < 0.006
    # the text stack's parameter count: 25.2 B, of which 22.8 B in the experts (26B-A4B with the vision tower)
    params = {e.name: e.parameters for e in plan.entries}
    assert sum(v for k, v in params.items() if ".experts." in k) == 30 * 128 * (1408 * 2816 + 2816 * 704)
    float_rows, _ = estimate(str(folder))
    assert 49e9 < sum(r[1] for r in float_rows) < 53e9  # bf16: about 50 GB


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["-q", "--q-bits", "3"], "--q-bits 3 is not supported"),
    (["-q", "--q-bits", "2"], "--q-bits 2 is not supported"),
    (["-q", "--q-group-size", "48"], "--q-group-size 48 is not supported"),
    (["-q", "--q-group-size", "16"], "--q-group-size 16 is not supported"),
    (["-q", "--q-mode", "nf4"], "--q-mode 'nf4' is not supported"),
    (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "--q-bits 8 is not supported for mode 'mxfp4'"),
    (["-q", "--q-group-size", "64"], "--q-group-size 64 does not divide the last dimension of layers.0.experts.down_proj.weight"),
    (["-q", "--q-group-size", "128", "--q-bits", "8"], "--q-group-size 128 does not divide the last dimension of"),
    (["--q-bits", "8"], "--q-bits given without -q/--quantize"),
    (["-q", "-d"], "--quantize and --dequantize cannot be used together"),
    (["-d"], "--dequantize needs a quantized MLX folder"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_quantization_flags(tiny, tmp_path, capsys, flags, message, dry_run):
    """A one-line error before anything is written; nothing is left behind (tiny: hidden 64, expert width 32)."""
    out = tmp_path / "out"
    argv = ["--hf-path", str(tiny[0]), "--mlx-path", str(out), *flags] + (["--dry-run"] if dry_run else [])
    assert convert_main(argv) == 1
    captured = capsys.readouterr()
    assert all(line.startswith("[INFO] Loading") for line in captured.out.splitlines())
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_group_size_cli_exit_status(tiny, tmp_path):
    result = run_cli("--hf-path", tiny[0], "--mlx-path", tmp_path / "out", "-q", "--q-group-size", "64")
    assert result.returncode == 1
    assert all(line.startswith("[INFO] Loading") for line in result.stdout.splitlines())
    assert result.stderr.strip().splitlines() == [
        "error: --q-group-size 64 does not divide the last dimension of layers.0.experts.down_proj.weight (4, 64, 32)"
    ]
    assert list(tmp_path.iterdir()) == []
