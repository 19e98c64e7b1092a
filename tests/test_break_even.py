"""benchmarks/break_even.py's counting against facts: the released model's published sizes and a simulation."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import break_even as B  # noqa: E402


def test_the_released_model_counts_26b_total_and_4b_active():
    p = B.parameter_counts(B.RELEASED)
    n, e = B.RELEASED["num_hidden_layers"], B.RELEASED["num_experts"]
    total = n * (p["dense_per_layer"] + e * p["expert"]) + p["embedding"]
    active, _ = B.step_cost(B.RELEASED, None)
    assert 25.0e9 < total < 26.5e9  # "26B total" (the vision tower and norms left out)
    assert 3.7e9 < active < 4.0e9  # "A4B": about 3.8B active per token


def test_distinct_experts_is_the_expectation_under_uniform_routing():
    rng = np.random.default_rng(0)
    for positions in (1, 4, 16, 64):
        seen = [len({int(x) for _ in range(positions) for x in rng.choice(128, 8, replace=False)})
                for _ in range(400)]
        assert abs(np.mean(seen) - B.distinct_experts(positions, 128, 8)) < 1.5


def test_a_step_over_one_position_reads_what_a_token_reads_plus_self_conditioning():
    token, _ = B.step_cost(B.RELEASED, None)
    one, _ = B.step_cost(B.RELEASED, 1)
    assert one - token == B.parameter_counts(B.RELEASED)["self_conditioning"]
    assert B.bytes_per_parameter(4) == 0.5625 and B.bytes_per_parameter(16) == 2
