"""A new user's first minutes: the demo says what it knows (and when input is outside it), --help answers without
loading MLX, and the statistics read right."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_dgemma
from mlx_dgemma import demo
from mlx_dgemma.diffusion import generate_tokens

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo_tasks  # noqa: E402


def test_banner_names_the_four_tasks_with_an_example_each():
    text = demo.banner()
    assert {t.name for t in demo.TASKS} == set(demo_tasks.TASKS)
    for task in demo.TASKS:
        assert task.example in text and task.ranges in text
        assert demo.out_of_range(task.example) is None


def test_the_banners_examples_are_problems_the_demo_solves():
    model, tokenizer = mlx_dgemma.load(demo.FOLDER)
    stop = set(model.sampler_defaults.eos_token_ids) | {model.sampler_defaults.pad_token_id}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t.example}]) for t in demo.TASKS]
    answers = [tokenizer.decode([i for i in row if i not in stop]) for row in generate_tokens(model, prompts, seed=0)]
    assert all(demo_tasks.check(t.example, a) for t, a in zip(demo.TASKS, answers)), answers


@pytest.mark.parametrize("prompt, fits", [
    ("hello", False), ("sort 31 4 15 9 26 5", False), ("sort 3 1", False), ("Sort: 7 2 9 4 1", True),
    ("reverse abcdefghij", False), ("reverse Cat", True), ("add 5+7", False), ("add: 10+99", True),
    ("sudoku 1234 .... .... ....", False), ("sudoku 24.. 13.4 .24. 41..", True),
])
def test_out_of_range_follows_the_training_ranges(prompt, fits):
    """The ranges of examples/demo_tasks.py's generators (the demo's lowercase tokenizer ignores case)."""
    note = demo.out_of_range(prompt)
    assert (note is None) == fits
    if note:
        assert note.startswith("note: ") and "\n" not in note


def _run(module, *args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def test_demo_cli_shows_the_banner_and_notes_garbage_input():
    r = _run("mlx_dgemma.generate", "--prompt", "sort 31 4 15 9 26 5", "--max-tokens", "8", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert demo.banner() in r.stderr and demo.out_of_range("sort 31 4 15 9 26 5") in r.stderr
    assert "Diffusion: 1 canvas," in r.stdout  # singular
    ok = _run("mlx_dgemma.generate", "--prompt", "add 34+57", "--max-tokens", "8", "--seed", "0")
    assert ok.returncode == 0 and "note:" not in ok.stderr


def test_demo_chat_notes_input_outside_the_demo():
    r = _run("mlx_dgemma.chat", "--seed", "0", "-m", "8", "--no-canvas", stdin="hello\nq\n")
    assert r.returncode == 0, r.stderr
    assert demo.out_of_range("hello") in r.stdout and "sort 7 2 9 4 1" in r.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "train", "fuse"])
def test_help_loads_no_mlx(command):
    """--help answers from the standard library: neither MLX nor numpy nor transformers is imported."""
    code = (f"import sys, runpy; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_module('mlx_dgemma.{command}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('mlx', 'mlx.core', 'numpy', 'transformers', 'torch') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "usage:" in r.stdout and "HEAVY []" in r.stdout, r.stdout[-500:] + r.stderr[-500:]
