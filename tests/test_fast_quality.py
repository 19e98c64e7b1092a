"""The quality gate's statistics (benchmarks/fast_quality.py) against direct computations."""

import math
import random

import numpy as np
import pytest

from benchmarks import fast_quality as fq


def test_answer_token_accuracy_counts_positions_over_the_longer_answer():
    assert fq.answer_token_accuracy([15, 18, 19], [15, 18, 19]) == 1.0
    assert fq.answer_token_accuracy([15, 17, 19], [15, 18, 19]) == pytest.approx(2 / 3)
    assert fq.answer_token_accuracy([15, 18], [15, 18, 19]) == pytest.approx(2 / 3)  # too short: 3rd missing
    assert fq.answer_token_accuracy([15, 18, 19, 20], [15, 18, 19]) == pytest.approx(3 / 4)  # too long: charged
    assert fq.answer_token_accuracy([18, 19], [15, 18, 19]) == 0.0  # shifted: no position matches
    assert fq.answer_token_accuracy([], [15]) == 0.0
    assert fq.answer_token_accuracy([], []) == 1.0


def test_answer_token_accuracy_matches_a_padded_comparison():
    rng = random.Random(0)
    for _ in range(200):
        expected = [rng.randrange(4) for _ in range(rng.randint(1, 9))]
        generated = [rng.randrange(4) for _ in range(rng.randint(0, 9))]
        width = max(len(expected), len(generated))
        e = np.array(expected + [-1] * (width - len(expected)))
        g = np.array(generated + [-2] * (width - len(generated)))
        assert fq.answer_token_accuracy(generated, expected) == pytest.approx((e == g).mean())


def test_paired_difference_of_outcomes_is_the_discordant_pairs_formula():
    rng = np.random.default_rng(1)
    ref = rng.random(500) < 0.9
    fast = np.where(rng.random(500) < 0.1, ~ref, ref)  # disagrees on ~10% of the problems
    d = fq.paired_difference(ref.astype(int).tolist(), fast.astype(int).tolist())
    n = len(ref)
    better, worse = int((fast & ~ref).sum()), int((ref & ~fast).sum())
    assert (d["n"], d["better"], d["worse"]) == (n, better, worse)
    assert d["diff"] == pytest.approx((better - worse) / n)
    assert d["stderr"] == pytest.approx(math.sqrt((better + worse - (better - worse) ** 2 / n) / (n * (n - 1))))
    diffs = fast.astype(float) - ref.astype(float)
    assert d["stderr"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(n))  # and the standard error of a mean
    # pairing removes the shared part of the two columns' variance: smaller than the unpaired error here
    unpaired = math.sqrt(ref.mean() * (1 - ref.mean()) / n + fast.mean() * (1 - fast.mean()) / n)
    assert d["stderr"] < unpaired


def test_paired_difference_of_real_values_and_bad_input():
    a, b = [0.5, 1.0, 0.25, 0.0], [0.75, 1.0, 0.0, 0.5]
    d = fq.paired_difference(a, b)
    x = np.array(b) - np.array(a)
    assert d["diff"] == pytest.approx(x.mean())
    assert d["stderr"] == pytest.approx(x.std(ddof=1) / 2)
    assert (d["better"], d["worse"]) == (2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        fq.paired_difference([1, 0], [1])


def _column(correct, tokens):
    n = len(correct)
    acc = sum(correct) / n
    return {"n": n, "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "token_accuracy": sum(tokens) / n,
            "tokens_per_forward": 1.0, "steps": 2.0, "visits_per_token": 3.0, "correct": correct,
            "token_accuracy_each": tokens}


def test_the_gate_table_prints_the_paired_numbers_and_says_when_a_miss_is_noise():
    ref = [1] * 95 + [0] * 5
    fast = [1] * 92 + [0] * 8  # -3 points: a miss of the 1-point rule, but inside two standard errors
    result = {"model": "demo", "columns": {"reference": {"add": _column(ref, [float(x) for x in ref])},
                                           "fast": {"add": _column(fast, [float(x) for x in fast])}}}
    assert fq.gate(result) == {"add": False}
    text = fq.table(result)
    assert "| add | 100 | 95.0% ±2.2 | 92.0% ±2.7 | -3.0 ±1.7 (0/3) |" in text
    assert "FAIL on add" in text and "not resolved" in text
    # columns measured before per-problem outcomes were kept still print
    for col in result["columns"].values():
        del col["add"]["correct"], col["add"]["token_accuracy_each"]
    assert "| — |" in fq.table(result)


def test_the_gate_says_when_it_passes_only_because_nothing_is_solved():
    zero = [0] * 10
    result = {"model": "long", "columns": {"reference": {"copy": _column(zero, [0.1] * 10)},
                                           "fast": {"copy": _column(zero, [0.2] * 10)}}}
    text = fq.table(result)
    assert "PASS" in text and "empty on copy" in text
    assert "| 10.0% | 20.0% | +10.0 ±0.0 |" in text


def test_runs_are_merged_only_when_they_pair_the_same_problems_and_draws():
    ref = {"model": "demo", "seed": 0, "per_task": 10, "columns": {"reference": {}}, "commits": {"reference": "a"}}
    fast = {"model": "demo", "seed": 0, "per_task": 10, "columns": {"fast": {}}, "commits": {"fast": "b"},
            "fast_levers": {}}
    merged = fq.merge([ref, fast])
    assert len(merged) == 1 and set(merged[0]["columns"]) == {"reference", "fast"}
    assert merged[0]["commits"] == {"reference": "a", "fast": "b"}
    with pytest.raises(ValueError, match="seed 0 and seed 1"):
        fq.merge([ref, dict(fast, seed=1)])
    with pytest.raises(ValueError, match="problems per task"):
        fq.merge([ref, dict(fast, per_task=20)])
