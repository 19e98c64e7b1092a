"""The canvas-256 model's tasks: checkable answers from a few tokens to 200+, like the released model's workload.

    add 48+37                          ->  85                                  (2-3 tokens)
    sudoku 53..7.... 6..195... ...     ->  534678912 672195348 ...             (9x9, 89 tokens)
    sort 7 2 9 4 1 ... (3-120 digits)  ->  1 2 4 7 9 ...                       (5-239 tokens)
    copy abcd... (20-250 letters)      ->  abcd...                             (20-250 tokens)

On a 256-token canvas a short answer leaves ~250 positions of EOS fill and a long one almost none, so a sampler
that skips settled positions and the EOS tail is measured on both extremes. The tokenizer, chat template, held-out
split and data files are the demo's (`demo_tasks.py`); only the problems differ.

    python examples/long_tasks.py --out data/long --seed 0     # train.jsonl, valid.jsonl, test.jsonl
"""

from __future__ import annotations

import random
from pathlib import Path

import demo_tasks

TASKS = ("add", "sudoku", "sort", "copy")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SORT_LENGTHS = (3, 120)
COPY_LENGTHS = (20, 250)
SUDOKU_BLANKS = (3, 15)

# --- 9x9 Sudoku --------------------------------------------------------------------------------------------------


def _solutions(cells: list[int], limit: int = 2) -> int:
    """How many completions `cells` (81 digits, 0 = blank) has, counting up to `limit`."""
    blank = next((i for i, v in enumerate(cells) if v == 0), None)
    if blank is None:
        return 1
    r, c = divmod(blank, 9)
    used = {cells[r * 9 + k] for k in range(9)} | {cells[k * 9 + c] for k in range(9)}
    br, bc = r - r % 3, c - c % 3
    used |= {cells[(br + i) * 9 + bc + j] for i in range(3) for j in range(3)}
    found = 0
    for v in range(1, 10):
        if v not in used:
            cells[blank] = v
            found += _solutions(cells, limit - found)
            cells[blank] = 0
            if found >= limit:
                break
    return found


def _grid_text(cells) -> str:
    s = "".join("." if v == 0 else str(v) for v in cells)
    return " ".join(s[i : i + 9] for i in range(0, 81, 9))


def random_grid(rng: random.Random) -> list[int]:
    """A valid solved grid: the standard pattern with its digits, rows, bands, columns and stacks shuffled."""
    digits = rng.sample(range(1, 10), 9)
    bands = rng.sample(range(3), 3)
    rows = [b * 3 + r for b in bands for r in rng.sample(range(3), 3)]
    stacks = rng.sample(range(3), 3)
    cols = [s * 3 + c for s in stacks for c in rng.sample(range(3), 3)]
    return [digits[(3 * (r % 3) + r // 3 + c) % 9] for r in rows for c in cols]


def make_sudoku(rng: random.Random) -> tuple[str, str]:
    grid = random_grid(rng)
    while True:
        puzzle = list(grid)
        for i in rng.sample(range(81), rng.randint(*SUDOKU_BLANKS)):
            puzzle[i] = 0
        if _solutions(puzzle) == 1:
            return f"sudoku {_grid_text(puzzle)}", _grid_text(grid)


def sudoku_valid(puzzle: str, answer: str) -> bool:
    """`answer` is a solved grid that keeps every given of `puzzle` (the puzzles have one solution)."""
    p, a = puzzle.replace(" ", ""), answer.replace(" ", "")
    if len(p) != 81 or len(a) != 81 or not a.isdigit() or "0" in a or answer != _grid_text(int(x) for x in a):
        return False
    if any(g != "." and g != v for g, v in zip(p, a)):
        return False
    groups = [[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
    groups += [[(br + i) * 9 + bc + j for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    return all(len({a[i] for i in g}) == 9 for g in groups)


# --- the other tasks ---------------------------------------------------------------------------------------------


def make_sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(*SORT_LENGTHS))]
    return "sort " + " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def make_copy(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*COPY_LENGTHS)))
    return f"copy {text}", text


MAKERS = {"add": demo_tasks.make_add, "sudoku": make_sudoku, "sort": make_sort, "copy": make_copy}


def make(task: str, rng: random.Random) -> tuple[str, str]:
    """One example; half of the prompts write the task as a label ("sort: 7 2 9"), as the demo's do."""
    return demo_tasks.make(task, rng, MAKERS)


def check(prompt: str, answer: str) -> bool:
    task, _, rest = prompt.lower().partition(" ")
    task, rest, answer = task.rstrip(":"), rest.strip(), answer.strip()
    if task == "sudoku":
        return sudoku_valid(rest, answer)
    if task == "copy":
        return answer == rest
    if task in ("add", "sort"):
        return demo_tasks.check(prompt, answer)
    raise ValueError(f"unknown task in {prompt!r}")


task_of = demo_tasks.task_of

# sudoku and sort have the most to learn; copy and add are one mechanism each (and the demo model knows add).
# The bundled run (examples/train_long.py) sees 3,600 examples, so none is repeated.
TRAIN_MIX = {"add": 5_000, "sudoku": 10_000, "sort": 10_000, "copy": 5_000}


def held_out(per_task: int, seed: int = 0) -> list[dict]:
    """The test split (bucket 0): the same rows as test.jsonl for this seed."""
    return [r for task in TASKS for r in demo_tasks.examples(task, per_task, seed, {0}, make=make)]


def write_data(out: Path, seed: int, train_per_task: dict[str, int], valid_per_task: int, test_per_task: int):
    demo_tasks.write_data(out, seed, train_per_task, valid_per_task, test_per_task, tasks=TASKS, make=make)


def main(argv=None):
    demo_tasks.main(argv, __doc__, TASKS, TRAIN_MIX, write_data)

if __name__ == "__main__":
    main()
