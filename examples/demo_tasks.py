"""The demo model's tasks, its tokenizer and chat template, and the data files it is trained on.

Four tasks whose answers can be checked exactly:

    sudoku .2.3 .... 2.3. .4.2   ->  1243 4321 2134 3412     (4x4 Sudoku, a unique solution, "." = blank)
    sort 7 2 9 4 1               ->  1 2 4 7 9
    reverse diffuse              ->  esuffid
    add 48+37                    ->  85

Sudoku is the showcase for diffusion: every cell constrains the others, so a model that fills the whole grid
at once, most certain cells first, suits it better than one that must commit to cells left to right.

    python examples/demo_tasks.py --out data/demo --seed 0     # train.jsonl, valid.jsonl, test.jsonl

Held-out split: an example whose problem (the prompt without the optional colon) hashes into bucket 0 (of 10) is
a test example, bucket 1 a validation example; training examples come from the other buckets only, so no test
problem is ever trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
from pathlib import Path

TASKS = ("sudoku", "sort", "reverse", "add")

# --- tasks -----------------------------------------------------------------------------------------------------


def _all_grids() -> list[tuple[int, ...]]:
    """Every valid 4x4 Sudoku grid (288), row-major, digits 1-4."""
    grids = []
    rows = list(itertools.permutations(range(1, 5)))
    for r0, r1, r2, r3 in itertools.product(rows, repeat=4):
        g = r0 + r1 + r2 + r3
        cols_ok = all(len({g[c], g[4 + c], g[8 + c], g[12 + c]}) == 4 for c in range(4))
        boxes_ok = all(
            len({g[r * 4 + c] for r in (br, br + 1) for c in (bc, bc + 1)}) == 4 for br in (0, 2) for bc in (0, 2)
        )
        if cols_ok and boxes_ok:
            grids.append(g)
    return grids


GRIDS = _all_grids()


def sudoku_solutions(puzzle: str) -> list[str]:
    """Every grid that completes `puzzle` ("1.3. .4.1 ..." rows, "." blank), as answer strings."""
    cells = puzzle.replace(" ", "")
    if len(cells) != 16:
        return []
    out = []
    for g in GRIDS:
        if all(c == "." or int(c) == v for c, v in zip(cells, g)):
            out.append(_grid_text(g))
    return out


def _grid_text(cells) -> str:
    s = "".join(str(c) for c in cells)
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def make_sudoku(rng: random.Random) -> tuple[str, str]:
    grid = rng.choice(GRIDS)
    while True:
        givens = rng.randint(5, 10)
        shown = set(rng.sample(range(16), givens))
        puzzle = _grid_text(str(v) if i in shown else "." for i, v in enumerate(grid))
        if len(sudoku_solutions(puzzle)) == 1:
            return f"sudoku {puzzle}", _grid_text(grid)


def make_sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 8))]
    return "sort " + " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def make_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return f"reverse {word}", word[::-1]


def make_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add {a}+{b}", str(a + b)


MAKERS = {"sudoku": make_sudoku, "sort": make_sort, "reverse": make_reverse, "add": make_add}


def make(task: str, rng: random.Random, makers: dict = MAKERS) -> tuple[str, str]:
    """One example; half of the prompts write the task as a label ("sort: 7 2 9" as well as "sort 7 2 9")."""
    prompt, answer = makers[task](rng)
    if rng.random() < 0.5:
        head, rest = prompt.split(" ", 1)
        prompt = f"{head}: {rest}"
    return prompt, answer


def task_of(prompt: str) -> str:
    return prompt.split(" ", 1)[0].rstrip(":").lower()


def check(prompt: str, answer: str) -> bool:
    """Is `answer` a correct reply to `prompt`? (Sudoku: any valid completion; the others: the exact answer.)"""
    task, _, rest = prompt.lower().partition(" ")
    task, rest = task.rstrip(":"), rest.strip()
    answer = answer.strip()
    if task == "sudoku":
        return answer in sudoku_solutions(rest)
    if task == "sort":
        return answer == " ".join(map(str, sorted(int(x) for x in rest.split())))
    if task == "reverse":
        return answer == rest[::-1]
    if task == "add":
        a, b = rest.split("+")
        return answer == str(int(a) + int(b))
    raise ValueError(f"unknown task in {prompt!r}")


def bucket(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10


def examples(task: str, count: int, seed: int, buckets: set[int], distinct: bool = True, make=make) -> list[dict]:
    """`count` examples of `task` whose problems fall in `buckets`; all different unless `distinct` is False
    (training sets of the small tasks, two-digit addition has only 8,100 problems, repeat some). `make` draws one
    example (another task set: `long_tasks.make`)."""
    rng = random.Random(f"{task}-{seed}-{sorted(buckets)}")
    seen, out = set(), []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise RuntimeError(f"{task}: cannot find {count} distinct examples in buckets {sorted(buckets)}")
        prompt, answer = make(task, rng)
        problem = prompt.replace(":", "", 1)  # the split and the de-duplication ignore the label's colon
        if bucket(problem) not in buckets or (distinct and problem in seen):
            continue
        seen.add(problem)
        out.append({"prompt": prompt, "completion": answer})
    return out


TRAIN_MIX = {"sudoku": 20_000, "sort": 20_000, "reverse": 50_000, "add": 50_000}  # the slow learners get more


def write_data(out: Path, seed: int, train_per_task: dict[str, int], valid_per_task: int, test_per_task: int,
               tasks=TASKS, make=make):
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": (train_per_task, set(range(2, 10))),
        "valid": ({t: valid_per_task for t in tasks}, {1}),
        "test": ({t: test_per_task for t in tasks}, {0}),
    }
    for name, (counts, buckets) in splits.items():
        rows = [r for task in tasks for r in examples(task, counts[task], seed, buckets, name != "train", make)]
        random.Random(f"shuffle-{name}-{seed}").shuffle(rows)
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} examples")


# --- tokenizer and chat template -------------------------------------------------------------------------------

# ids 0-4 in Gemma's order; the image markers exist only because the model's config names them (no vision here)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|user>", "<|model>", "<|system>", "<turn|>",
           "<|image>", "<image|>", "<|image|>"]
CHARACTERS = list("\n 0123456789abcdefghijklmnopqrstuvwxyz+-*=.,:;?!'\"()/_|#")

# One token per role keeps prompts short: <bos><|user>sort 3 1 2<turn|><|model>  ->  1 2 3<eos>
# The demo solves one problem per message and knows no conversation (it is trained on single problems), so the
# template renders only the latest user message (and a reply to it): in `python -m mlx_dgemma.chat` every message
# is a new problem.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- set ns = namespace(start=0) -%}\n"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.start = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}\n"
    "{%- for message in messages[ns.start:] -%}\n"
    "{%- if message['role'] == 'user' -%}{{- '<|user>' -}}\n"
    "{%- elif message['role'] in ['assistant', 'model'] -%}{{- '<|model>' -}}\n"
    "{%- elif message['role'] == 'system' -%}{{- '<|system>' -}}\n"
    "{%- else -%}{{- raise_exception('Unsupported message role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- (message['content'] | trim) + '<turn|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|model>' -}}{%- endif -%}\n"
)


def build_tokenizer():
    """A character-level `tokenizers` tokenizer (lower-cased input; unknown characters become <unk>)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok


def write_tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "padding_side": "left",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024,
    }, indent=2))
    return len(SPECIAL) + len(CHARACTERS)


def main(argv=None, doc: str = __doc__, tasks=TASKS, mix=TRAIN_MIX, write=write_data):
    """The data command line; `long_tasks.py` runs it with its own tasks, mix and writer."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, help="Training examples per task (default: TRAIN_MIX)")
    p.add_argument("--valid", type=int, default=50, help="Validation examples per task")
    p.add_argument("--test", type=int, default=500, help="Held-out test examples per task")
    a = p.parse_args(argv)
    write(Path(a.out), a.seed, {t: a.train for t in tasks} if a.train else mix, a.valid, a.test)

if __name__ == "__main__":
    main()
