"""The backend profiles (backend.py): picked once, overridable, and the GPU's code paths equal to the CPU's."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_dgemma
from mlx_dgemma import backend
from mlx_dgemma.config import ModelArgs
from mlx_dgemma.generate import generate_tokens
from mlx_dgemma.switch import Experts

ROOT = Path(__file__).resolve().parents[1]


def experts(quantized: bool) -> Experts:
    args = ModelArgs(hidden_size=64, moe_intermediate_size=32, num_experts=8, top_k_experts=2, num_hidden_layers=1,
                     intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    module = Experts(args)
    key = mx.random.key(0)
    for name, proj in (("gate_up", module.gate_up_proj), ("down", module.down_proj)):
        key, sub = mx.random.split(key)
        proj.weight = 0.2 * mx.random.normal(proj.weight.shape, key=sub)
    if quantized:
        nn.quantize(module, group_size=32, bits=4)
    return module


ROUTINGS = {
    # 40 tokens x top-2 over 8 experts: every expert gets rows (some more than one block of 32)
    "every expert": np.stack([np.arange(40) % 8, (np.arange(40) * 3 + 1) % 8], axis=1),
    # experts 0, 3 and 5..7 get no rows; expert 1 gets every token
    "some idle": np.stack([np.full(40, 1), np.where(np.arange(40) % 3 == 0, 2, 4)], axis=1),
}


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_gpu_path_experts_equal_cpu_path(routing, quantized):
    module = experts(quantized)
    idx = mx.array(ROUTINGS[routing], dtype=mx.uint32)
    x = mx.random.normal((40, 64), key=mx.random.key(1))
    counts = np.bincount(ROUTINGS[routing].ravel(), minlength=8)
    assert (counts > 0).all() if routing == "every expert" else (counts == 0).sum() == 5
    sorted_rows = module._sorted_rows(x, idx)
    for block in (16, 32):  # both block sizes the CPU profile picks from
        blocked = module._blocked(x, idx, block)
        assert blocked.shape == sorted_rows.shape == (40, 2, 64)
        assert np.abs(np.array(blocked) - np.array(sorted_rows)).max() < 1e-5
    # and the whole layer, weights included, under each profile
    weights = mx.softmax(mx.random.normal((40, 2), key=mx.random.key(2)), axis=-1)
    outs = []
    for name in ("cpu", "gpu"):
        with backend.using(name):
            outs.append(np.array(module(x, idx, weights)))
    assert np.abs(outs[0] - outs[1]).max() < 1e-5


def test_profiles_give_the_same_seeded_generation(tiny_chat_folder):
    model, _ = mlx_dgemma.load(tiny_chat_folder)
    rows = {}
    for name in ("cpu", "gpu"):
        with backend.using(name):
            rows[name] = generate_tokens(model, [[2, 10, 11, 12], [2, 30]], max_tokens=32, seed=5, eos_token_ids=[])
    assert rows["cpu"] == rows["gpu"] and len(rows["cpu"][0]) == 32


def test_profile_is_picked_from_the_device_and_overridable(monkeypatch):
    previous = backend.use(None)
    try:
        monkeypatch.delenv("MLX_DGEMMA_PROFILE", raising=False)
        assert backend.current().name == ("cpu" if mx.default_device() == mx.cpu else "gpu")
        backend.use(None)
        monkeypatch.setenv("MLX_DGEMMA_PROFILE", "gpu")
        assert backend.current() == backend.GPU
        backend.use(None)
        monkeypatch.setenv("MLX_DGEMMA_PROFILE", "tpu")
        with pytest.raises(ValueError, match="MLX_DGEMMA_PROFILE='tpu'"):
            backend.current()
        monkeypatch.setenv("MLX_DGEMMA_LIBM", "1")
        assert backend.resolve("cpu").fast_math is False and backend.resolve("cpu").lanes
    finally:
        backend.use(previous)


def test_wired_memory_is_a_no_op_off_metal(tiny_chat_folder):
    model, _ = mlx_dgemma.load(tiny_chat_folder)
    with backend.using("gpu"):
        with backend.wired_memory(model):  # no Metal here: must not touch the wired limit, nor fail
            pass


def test_environment_picks_the_profile_in_a_fresh_process():
    code = "import mlx_dgemma.backend as b; print(b.current().name)"
    env = {"PYTHONPATH": str(ROOT), "MLX_DGEMMA_PROFILE": "gpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "gpu", out.stderr


def test_cpu_expert_block_follows_the_rows_per_expert():
    cpu = backend.resolve("cpu")
    assert cpu.expert_block(16 * 8, 32) == 16  # a small step: 4 rows per expert, less padding
    assert cpu.expert_block(256 * 8, 128) == 16  # the released model's canvas: 16 rows per expert
    assert cpu.expert_block(256 * 8, 32) == 32  # 64 rows per expert: fuller products

