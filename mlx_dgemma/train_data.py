"""The trainer's data: JSONL records checked and tokenized into `Example`s, batches of whole canvases with their
block-causal masks (`make_batch`), the corruption and self-conditioning draws (`draw_noise`) and the order the
examples are drawn in (`batch_indices`), each a pure function of (seed, step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FULL, SLIDING, ModelArgs

GROUP = 16  # batches drawn together and grouped by length


class DataError(ValueError):
    """The training data cannot be used; the message names the file and the lines."""


# --- data ------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]  # without the closing EOS
    line: int


def _describe(errors: list[str], total: int, limit: int = 10) -> str:
    shown = "\n  ".join(errors[:limit])
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    return f"{shown}{more}"


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """`(line number, record)` for every non-blank line; all malformed lines are reported together."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records, errors = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"line {number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        problem = _record_problem(record)
        if problem:
            errors.append(f"line {number}: {problem}")
            continue
        records.append((number, record))
    if errors:
        raise DataError(f"{path}: {len(errors)} malformed line(s):\n  {_describe(errors, len(lines))}")
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def _record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            return '"messages" must be a list of at least two messages (a prompt and the answer)'
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be an object with string "role" and "content"'
        if messages[-1]["role"] not in ("assistant", "model"):
            return f'the last message is the trained answer and must have role "assistant" (found {messages[-1]["role"]!r})'
        return None
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f'"{key}" must be a string'
        return None
    return 'expected "prompt" and "completion", or "messages"'


def tokenize(record: dict, tokenizer, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for one record, the prompt rendered the way generation renders it."""
    if "messages" in record:
        messages, answer = record["messages"][:-1], record["messages"][-1]["content"]
        if not tokenizer.has_chat_template:
            raise DataError("chat messages need a chat template, and this model's tokenizer has none")
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        answer = record["completion"]
        if chat_template and tokenizer.has_chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)
        else:
            prompt = tokenizer.encode(record["prompt"])
    return list(prompt), tokenizer.encode(answer, add_special_tokens=False)


def load_examples(path: Path, tokenizer, chat_template: bool = True) -> list[Example]:
    out = []
    for number, record in read_jsonl(path):
        prompt, answer = tokenize(record, tokenizer, chat_template)
        if not prompt:
            raise DataError(f"{path}: line {number}: the prompt is empty after tokenization")
        out.append(Example(prompt, answer, number))
    return out


def canvases_needed(example: Example, canvas_length: int) -> int:
    """Canvases for the answer plus at least one closing EOS."""
    return -(-(len(example.answer) + 1) // canvas_length)


def check_budget(examples: list[Example], path, canvas_length: int, max_canvases: int, max_seq_length: int):
    """Every example must fit the canvas budget; otherwise say which lines do not and what to change."""
    too_long = []
    for e in examples:
        n = canvases_needed(e, canvas_length)
        total = len(e.prompt) + n * canvas_length
        if n > max_canvases or total > max_seq_length:
            too_long.append(
                f"line {e.line}: answer {len(e.answer)} tokens (+ EOS) = {n} canvas(es), prompt {len(e.prompt)} tokens,"
                f" {total} in all"
            )
    if too_long:
        raise DataError(
            f"{path}: {len(too_long)} of {len(examples)} examples do not fit the canvas budget: at most"
            f" {max_canvases} canvas(es) of {canvas_length} tokens per answer (--max-canvases; the answer needs one"
            f" closing EOS) and {max_seq_length} tokens per example (--max-seq-length):\n  {_describe(too_long, len(examples))}\n"
            "Raise --max-canvases / --max-seq-length, or shorten or remove these examples."
        )


def data_files(data: Path) -> tuple[Path, Path | None]:
    data = Path(data)
    if data.is_file():
        return data, None
    if not data.is_dir():
        raise DataError(f"{data}: no such file or folder")
    train = data / "train.jsonl"
    if not train.is_file():
        raise DataError(f"{data}: no train.jsonl in this folder")
    valid = data / "valid.jsonl"
    return train, (valid if valid.is_file() else None)


# --- batches ---------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    encoder_ids: np.ndarray  # [B, Lp + (n-1)C]: left-padded prompt, then the clean canvases but the last
    encoder_mask: np.ndarray | None  # [B, Lp + (n-1)C] bool, None when nothing is padded
    targets: np.ndarray  # [B, nC]: the answer, closed and filled with EOS
    canvas_weight: np.ndarray  # [B, nC] float32: 1 on canvases this example has, 0 on batch filler
    ar_weight: np.ndarray  # [B, (n-1)C] float32: 1 where the encoder's next-token target is the example's answer
    decoder_masks: dict  # layer type -> [B, 1, nC, Lp + (n-1)C + nC] bool (block-causal)
    prompt_length: int  # Lp
    canvases: int  # n
    tokens: int  # real tokens (prompts + trained canvases)


def make_batch(examples: list[Example], args: ModelArgs, pad_id: int, eos_id: int) -> Batch:
    C, W = args.canvas_length, args.sliding_window
    B = len(examples)
    Lp = max(len(e.prompt) for e in examples)
    counts = [canvases_needed(e, C) for e in examples]
    n = max(counts)
    Le = Lp + (n - 1) * C
    encoder_ids = np.full((B, Le), pad_id, dtype=np.int32)
    real = np.zeros((B, Le), dtype=bool)
    targets = np.full((B, n * C), eos_id, dtype=np.int32)
    canvas_weight = np.zeros((B, n * C), dtype=np.float32)
    ar_weight = np.zeros((B, (n - 1) * C), dtype=np.float32)
    for i, (e, k) in enumerate(zip(examples, counts)):
        targets[i, : len(e.answer)] = e.answer
        canvas_weight[i, : k * C] = 1
        ar_weight[i, : (k - 1) * C] = 1
        encoder_ids[i, Lp - len(e.prompt) : Lp] = e.prompt
        real[i, Lp - len(e.prompt) :] = True
    encoder_ids[:, Lp:] = targets[:, : (n - 1) * C]

    # Canvas k (query positions Lp + kC ...) sees cached keys before Lp + kC that are real tokens (on sliding
    # layers only the last W - 1 of them, all a sliding cache keeps), and every position of its own canvas.
    block = np.repeat(np.arange(n), C)  # canvas of each decoder query
    start = Lp + block * C  # the cache length each canvas is denoised over
    key = np.arange(Le)
    seen = key[None, :] < start[:, None]  # [nC, Le]
    own = block[:, None] == block[None, :]  # [nC, nC]
    masks = {}
    for kind in (SLIDING, FULL):
        visible = seen & (key[None, :] >= start[:, None] - (W - 1)) if kind == SLIDING else seen
        cached = visible[None] & real[:, None, :]  # [B, nC, Le]
        canvas = np.broadcast_to(own[None], (B, n * C, n * C))
        masks[kind] = np.concatenate([cached, canvas], axis=-1)[:, None]
    tokens = int(real.sum() - real[:, Lp:].sum() + canvas_weight.sum())
    return Batch(
        encoder_ids, None if real.all() else real, targets, canvas_weight, ar_weight, masks, Lp, n, tokens
    )


@dataclass
class Noise:
    """One step's random draws (numpy, from the seed and the step alone)."""

    corrupt: np.ndarray  # [B, nC] bool
    noise_ids: np.ndarray  # [B, nC] int32
    self_conditioning: np.ndarray  # [B] float32, 1 = this example gets the first pass's distribution


def draw_noise(rng: np.random.Generator, batch: Batch, vocab_size: int, canvas_length: int, t_min: float,
               sc_prob: float) -> Noise:
    B, total = batch.targets.shape
    t = rng.uniform(t_min, 1.0, size=(B, batch.canvases))  # one noise level per canvas
    corrupt = rng.random((B, total)) < np.repeat(t, canvas_length, axis=1)
    noise_ids = rng.integers(0, vocab_size, size=(B, total), dtype=np.int32)
    sc = (rng.random(B) < sc_prob).astype(np.float32)
    return Noise(corrupt, noise_ids, sc)


# --- the order of the examples ----------------------------------------------------------------------------------------


def _stream(n_examples: int, first: int, count: int, seed: int) -> list[int]:
    """Items [first, first + count) of an endless stream of per-epoch permutations, each from (seed, epoch)."""
    out = []
    epoch, offset = divmod(first, n_examples)
    while len(out) < count:
        perm = np.random.default_rng([seed, epoch, 0]).permutation(n_examples)
        out.extend(perm[offset : offset + count - len(out)].tolist())
        epoch, offset = epoch + 1, 0
    return out


def batch_indices(lengths: list[int], batch_size: int, step: int, seed: int, group: int = GROUP) -> list[int]:
    """Examples of step `step` (0-based), a function of (seed, step) alone.

    Every `group` consecutive batches draw their examples together from the shuffled stream, sort them by length
    and cut them into batches of similar length (less padding), which are then taken in a shuffled order.
    """
    block, within = divmod(step, group)
    pool = _stream(len(lengths), block * group * batch_size, group * batch_size, seed)
    pool.sort(key=lambda i: lengths[i])
    order = np.random.default_rng([seed, block, 3]).permutation(group)
    k = int(order[within])
    return pool[k * batch_size : (k + 1) * batch_size]
