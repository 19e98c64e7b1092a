"""The bundled demo model: a small DiffusionGemma trained here on checkable tasks (see examples/).

`python -m mlx_dgemma.generate` and `python -m mlx_dgemma.chat` run it when no `--model` is given. It knows four
kinds of problem, in the ranges it was trained on (`examples/demo_tasks.py`), and nothing else: `banner()` says
which, and `out_of_range(prompt)` gives a one-line note for input outside them (which gets garbage back).
"""

import re
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).parent
DEFAULT_PROMPT = "Sort: 7 2 9 4 1"
RELEASED_MODEL_HINT = (
    "This is the bundled demo model. For the released model: python -m mlx_dgemma.convert "
    "--hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q, then --model dgemma-4bit"
)


@dataclass(frozen=True)
class Task:
    name: str
    example: str
    ranges: str
    fits: object  # (the prompt after the task name) -> bool


def _sort(rest: str) -> bool:
    numbers = rest.split()
    return 3 <= len(numbers) <= 8 and all(re.fullmatch(r"[0-9]", n) for n in numbers)


def _reverse(rest: str) -> bool:
    return re.fullmatch(r"[a-z]{3,8}", rest.strip().lower()) is not None


def _add(rest: str) -> bool:
    return re.fullmatch(r"\s*[1-9][0-9]\s*\+\s*[1-9][0-9]\s*", rest) is not None


def _sudoku(rest: str) -> bool:
    cells = rest.replace(" ", "")
    return re.fullmatch(r"[1-4.]{16}", cells) is not None and 5 <= sum(c != "." for c in cells) <= 10


# The generators' ranges in examples/demo_tasks.py (make_sort, make_reverse, make_add, make_sudoku).
TASKS = (
    Task("sort", "sort 7 2 9 4 1", "3 to 8 single digits (0-9)", _sort),
    Task("reverse", "reverse planet", "one word of 3 to 8 letters a-z", _reverse),
    Task("add", "add 34+57", "two two-digit numbers (10-99)", _add),
    Task("sudoku", "sudoku 24.. 13.4 .24. 41..", "a 4x4 grid of 1-4, '.' for blanks, 5 to 10 given", _sudoku),
)


def banner() -> str:
    """What the demo knows, with one example each."""
    lines = ["The demo model solves four kinds of problem (a task word, then the problem; anything else gives garbage):"]
    width = max(len(t.example) for t in TASKS)
    lines += [f"  {t.example:<{width}}   {t.ranges}" for t in TASKS]
    return "\n".join(lines)


def out_of_range(prompt: str) -> str | None:
    """A one-line note when `prompt` is not one of the demo's problems in its trained ranges, else None."""
    head, _, rest = prompt.strip().partition(" ")
    task = next((t for t in TASKS if t.name == head.rstrip(":").lower()), None)
    if task is None:
        names = ", ".join(t.name for t in TASKS)
        return f"note: the demo model only knows {names} (e.g. '{TASKS[0].example}'); expect garbage"
    if not task.fits(rest):
        return f"note: the demo's {task.name} was trained on {task.ranges} (e.g. '{task.example}'); expect garbage"
    return None


def available() -> bool:
    return (FOLDER / "config.json").is_file()
