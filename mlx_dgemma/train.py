"""Fine-tune (or train from scratch) a DiffusionGemma with the block-diffusion objective, in MLX.

    python -m mlx_dgemma.train --model PATH --data DATA [--fine-tune-type lora|full] --iters 1000

`DATA` is a folder holding `train.jsonl` (and optionally `valid.jsonl`) or one `.jsonl` file. Each line is
`{"prompt": "...", "completion": "..."}` or `{"messages": [{"role": "user", "content": ...}, ...,
{"role": "assistant", "content": ...}]}`; prompts go through the model's chat template (as generation renders
them), and the last assistant message is the answer that is trained.

The objective (as the public DiffusionGemma fine-tuning recipes define it):

- The encoder reads the prompt and the answer's clean canvases causally into the KV cache; gradients flow through
  the cache into the shared weights.
- The answer, closed and filled to whole canvases with EOS, is cut into canvases of `canvas_length` tokens.
  Every canvas is trained at once with a block-causal decoder view: canvas k sees the prompt and the clean
  canvases before it (the last `sliding_window - 1` of those tokens on sliding layers), at the positions generation
  gives it, plus itself bidirectionally.
- Uniform-state corruption: per canvas t ~ U(0.001, 1); each position becomes a uniformly random vocabulary id
  with probability t (there is no mask token).
- Two-pass self-conditioning: a first decoder pass without gradients; for half of the examples its distribution
  is fed to the second pass as self-conditioning, the others get none. The loss is on the second pass.
- Loss: mean cross-entropy over every canvas position (corrupted or not, the EOS fill included), no 1/t weight;
  answers of several canvases add the encoder's autoregressive cross-entropy on their clean canvases (weight 1).

A run is a pure function of its seed: the data order, the corruption and self-conditioning draws of step `s`
depend only on (seed, s), so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import cpu
from .cache import Cache
from .config import FULL, SLIDING, ModelArgs, read_json

CHECKPOINTS = "checkpoints"
GROUP = 16  # batches drawn together and grouped by length
FROZEN_BUFFERS = ("layer_scalar", "encoder_layer_scalar")  # buffers in the reference, never trained


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


# --- a faster activation for training on CPUs -----------------------------------------------------------------

# MLX's CPU backend evaluates tanh one element at a time, and the tanh-approximated GELU of the dense MLP, the
# experts and self-conditioning was over half of a training step on a CPU. Training uses the same function
# computed with `cpu.tanh_rational` (Eigen's rational approximation, exact to a few float32 ulps: |error| < 1e-6 against
# `nn.gelu_approx`), compiled into one fused pass each way. Inference is untouched.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@mx.compile
def _gelu_forward(x):
    return 0.5 * x * (1 + cpu.tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


@mx.compile
def _gelu_backward(x, cotangent):
    t = cpu.tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return cotangent * slope


@mx.custom_function
def gelu_tanh(x):
    """`nn.gelu_approx` (the reference's gelu_pytorch_tanh) within 1e-6, fast on CPUs, with its own gradient."""
    return _gelu_forward(x)


@gelu_tanh.vjp
def _gelu_tanh_vjp(primals, cotangent, output):
    return _gelu_backward(primals, cotangent)


def _training_classes():
    from .model import MLP, Experts, SelfConditioning, rms_normalize

    class TrainingMLP(MLP):
        def __call__(self, x):
            return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))

    class TrainingExperts(Experts):
        def _glu(self, x, indices, sorted_indices):
            gate, up = mx.split(self.gate_up_proj(x, indices, sorted_indices=sorted_indices), 2, axis=-1)
            return self.down_proj(gelu_tanh(gate) * up, indices, sorted_indices=sorted_indices)

    class TrainingSelfConditioning(SelfConditioning):
        def __call__(self, x, soft):
            if soft is not None:
                n = self.pre_norm(soft)
                x = x + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
            return rms_normalize(x, self.eps)

    return {MLP: TrainingMLP, Experts: TrainingExperts, SelfConditioning: TrainingSelfConditioning}


class training_activations:
    """Within the block, the model's GELUs run through `gelu_tanh` (same weights, same modules)."""

    def __init__(self, model):
        self.model, self.swapped = model, []

    def __enter__(self):
        classes = _training_classes()
        for _, module in self.model.named_modules():
            for base, sub in classes.items():
                if type(module) is base:
                    module.__class__ = sub
                    self.swapped.append((module, base))
        return self.model

    def __exit__(self, *exc):
        for module, base in self.swapped:
            module.__class__ = base
        self.swapped = []


# --- the objective ---------------------------------------------------------------------------------------------


def _training_cache(model) -> Cache:
    """A cache that keeps every token (the block-causal masks do the windowing), so all canvases train at once."""
    cache = model.make_cache()
    for layer in cache.layers:
        layer.keep = None
    return cache


def _cache_rows(cache: Cache, rows: mx.array) -> Cache:
    """The same cache restricted to some batch rows (arrays are shared, not copied)."""
    sub = Cache.__new__(Cache)
    sub.__dict__.update(cache.__dict__)
    sub.layers = []
    for layer in cache.layers:
        copy = type(layer).__new__(type(layer))
        copy.__dict__.update(layer.__dict__)
        if layer.keys is not None:
            copy.keys, copy.values = layer.keys[rows], layer.values[rows]
        sub.layers.append(copy)
    sub.token_mask = None if cache.token_mask is None else cache.token_mask[rows]
    return sub


def decode_canvases(model, canvas: mx.array, cache: Cache, offset: int, masks: dict, soft: mx.array | None):
    """The decoder over several canvases at once (positions from `offset`), with explicit block-causal masks."""
    h = model.self_conditioning(model._embed(canvas), soft)
    for layer, layer_cache in zip(model.layers, cache.layers):
        h = layer(h, offset, layer_cache, masks[layer.layer_type], encode=False)
    return model.lm_head(model.norm(h))


def loss_terms(model, batch: Batch, noise: Noise, ar_weight: float = 1.0):
    """(loss, diffusion cross-entropy, autoregressive cross-entropy) for one batch, as MLX scalars."""
    targets = mx.array(batch.targets)
    masks = {k: mx.array(v) for k, v in batch.decoder_masks.items()}
    cache = _training_cache(model)
    mask = None if batch.encoder_mask is None else mx.array(batch.encoder_mask)
    hidden = model.encode(mx.array(batch.encoder_ids), cache, attention_mask=mask)
    noisy = mx.where(mx.array(noise.corrupt), mx.array(noise.noise_ids), targets)
    Lp = batch.prompt_length

    soft = None
    rows = np.flatnonzero(noise.self_conditioning)
    if len(rows):
        # The first pass runs only on the examples that get self-conditioning; the others get none (zeros).
        every = len(rows) == noisy.shape[0]
        take = None if every else mx.array(rows)
        sub_cache = cache if every else _cache_rows(cache, take)
        sub_masks = masks if every else {k: v[take] for k, v in masks.items()}
        first = decode_canvases(model, noisy if every else noisy[take], sub_cache, Lp, sub_masks, None)
        probs = mx.softmax(mx.stop_gradient(first), axis=-1)
        emb = model.embed_tokens_matmul(probs, transpose=False)
        emb = emb * model._embed_scale(emb.dtype)
        if every:
            soft = emb
        else:
            soft = mx.zeros((noisy.shape[0], *emb.shape[1:]), dtype=emb.dtype)
            soft[take] = emb
    logits = decode_canvases(model, noisy, cache, Lp, masks, soft)
    weight = mx.array(batch.canvas_weight)
    diffusion = (nn.losses.cross_entropy(logits, targets) * weight).sum() / weight.sum()

    autoregressive = mx.array(0.0)
    if batch.canvases > 1 and batch.ar_weight.any():
        w = mx.array(batch.ar_weight)
        ar_logits = model.lm_head(hidden[:, Lp - 1 : -1])
        ce = nn.losses.cross_entropy(ar_logits, mx.array(batch.encoder_ids[:, Lp:]))
        autoregressive = (ce * w).sum() / w.sum()
    return diffusion + ar_weight * autoregressive, diffusion, autoregressive


# --- model setup, saving ---------------------------------------------------------------------------------------


def init_weights(model, seed: int, std: float = 0.02):
    """Initialisation for a model trained from scratch: the reference's N(0, std) for every matrix (linears,
    embedding, experts) and ones for norms and scales, except the query and key norms, which start at
    head_dim ** -0.25: Gemma 4 attention has no 1/sqrt(head_dim) factor, and unit-RMS queries and keys give
    attention logits of spread sqrt(head_dim) at the start, a saturated softmax that slows early learning (on
    the demo's reversal task: validation loss 0.92 instead of 1.08 after 500 steps). Training moves them freely."""
    key = mx.random.key(seed)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, value), k in zip(params, keys):
        if value.ndim >= 2:
            new.append((name, (std * mx.random.normal(value.shape, key=k)).astype(value.dtype)))
        elif name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            new.append((name, mx.full(value.shape, value.shape[0] ** -0.25, dtype=value.dtype)))
        else:
            new.append((name, mx.ones(value.shape, dtype=value.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def build_model(folder: Path, from_scratch: bool, seed: int):
    from .loading import load_model
    from .model import Model
    from .config import SamplerConfig

    if not from_scratch:
        return load_model(folder)
    args = ModelArgs.from_file(folder / "config.json")
    model = Model(args)
    init_weights(model, seed)
    model.sampler_defaults = SamplerConfig.from_folder(folder, args)
    return model


def save_model(model, source: Path, out: Path, dtype: mx.Dtype | None = None):
    """A loadable model folder: the weights (ours), plus the source's config, generation config, tokenizer and
    any vision weights the source carries (the text model does not hold them)."""
    from .convert import COPIED_FILES
    from .model import VISION_PREFIXES, checkpoint_name
    from .weights import DTYPE_NAMES, checkpoint_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if any(k.endswith((".lora_a", ".lora_b")) for k in weights):
        raise ValueError("fuse the LoRA adapters (lora.fuse_model) before saving the model")
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        files = checkpoint_files(source)
    except Exception:
        files = []
    for path in files:
        if path.suffix == ".safetensors":
            for name, value in mx.load(str(path)).items():
                ours = checkpoint_name(name)
                if ours is not None and ours.startswith(VISION_PREFIXES):
                    weights[ours] = value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = read_json(source / "config.json")
    floats = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    names = {v: k for k, v in DTYPE_NAMES.items()}
    if len(floats) == 1 and next(iter(floats)) in names:
        config["dtype"] = names[next(iter(floats))]
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    for name in COPIED_FILES:
        if (source / name).is_file() and Path(source / name).resolve() != (out / name).resolve():
            shutil.copy2(source / name, out / name)


# --- checkpoints -----------------------------------------------------------------------------------------------


def _checkpoint_dir(save_path: Path, step: int) -> Path:
    return save_path / CHECKPOINTS / f"step_{step:07d}"


def save_checkpoint(save_path: Path, step: int, model, optimizer, meta: dict):
    folder = _checkpoint_dir(save_path, step)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def latest_checkpoint(save_path: Path) -> Path | None:
    found = sorted((save_path / CHECKPOINTS).glob("step_???????")) if (save_path / CHECKPOINTS).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(folder: Path, model, optimizer, meta: dict) -> int:
    state = json.loads((folder / "state.json").read_text())
    for key in ("seed", "fine_tune_type", "batch_size"):
        if key in meta and state.get(key) != meta[key]:
            raise ValueError(f"{folder}: was written with {key}={state.get(key)!r}, this run has {meta[key]!r}")
    trainable = mx.load(str(folder / "trainable.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(trainable) != set(expected):
        raise ValueError(f"{folder}: its trainable weights do not match this model and fine-tuning type")
    model.update(tree_unflatten(list(trainable.items())))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return int(state["step"])


# --- the loop --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"  # or "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    t_min: float = 0.001
    sc_prob: float = 0.5
    ar_weight: float = 1.0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 8
    save_every: int = 0  # 0: only at the end


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


def make_schedule(cfg: TrainConfig):
    lr = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        main = lr
    elif cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(cfg.iters - cfg.warmup, 1), end=lr * 0.1)
    else:
        raise ValueError(f"--lr-schedule {cfg.lr_schedule!r}: choose constant or cosine")
    if cfg.warmup > 0:
        main = main if callable(main) else (lambda _: lr)
        return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, cfg.warmup), main], [cfg.warmup])
    return main


class Progress:
    """One line, redrawn in place on a terminal; a line every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, stream=None):
        self.total, self.every, self.stream = total, max(1, every), stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_step, self.started = start, time.perf_counter()
        self.tokens, self.window_start, self.window_tokens = 0, time.perf_counter(), 0

    def update(self, step: int, loss: float, tokens: int, lr: float, extra: str = ""):
        self.tokens += tokens
        self.window_tokens += tokens
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        done = step - self.start_step
        eta = (now - self.started) / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"{step}/{self.total} [{bar}] loss {loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e} | "
                f"eta {int(eta) // 60}:{int(eta) % 60:02d}{extra}")
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        if step % self.every == 0:
            self.window_start, self.window_tokens = now, 0

    def note(self, text: str):
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def evaluate(model, examples: list[Example], cfg: TrainConfig, pad_id: int, eos_id: int) -> float:
    """Mean loss over fixed validation batches with fixed noise (comparable across steps and runs)."""
    with training_activations(model):
        return _evaluate(model, examples, cfg, pad_id, eos_id)


def _evaluate(model, examples, cfg, pad_id, eos_id) -> float:
    args = model.args
    total, count = 0.0, 0
    for b in range(cfg.val_batches):
        chunk = examples[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if not chunk:
            break
        batch = make_batch(chunk, args, pad_id, eos_id)
        noise = draw_noise(np.random.default_rng([cfg.seed, b, 2]), batch, args.vocab_size, args.canvas_length,
                           cfg.t_min, cfg.sc_prob)
        loss, _, _ = loss_terms(model, batch, noise, cfg.ar_weight)
        total += loss.item() * len(chunk)
        count += len(chunk)
    return total / max(count, 1)


def train(
    model,
    train_set: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    eos_id: int,
    valid_set: list[Example] | None = None,
    save_path: Path | None = None,
    resume: bool = False,
    meta: dict | None = None,
    on_save=None,
    stream=None,
    quiet: bool = False,
) -> list[float]:
    """Run `cfg.iters` steps on the model's trainable parameters; returns the loss of every step run."""
    schedule = make_schedule(cfg)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    meta = {"seed": cfg.seed, "batch_size": cfg.batch_size, **(meta or {})}
    start = 0
    if resume and save_path is not None:
        found = latest_checkpoint(save_path)
        if found is not None:
            start = load_checkpoint(found, model, optimizer, meta)
            if not quiet:
                print(f"[INFO] Resuming from {found} (step {start})", file=stream or sys.stdout)
    model.train()
    loss_and_grad = nn.value_and_grad(model, lambda m, b, n: loss_terms(m, b, n, cfg.ar_weight))
    progress = Progress(cfg.iters, start, cfg.steps_per_report, stream) if not quiet else None
    with training_activations(model):
        losses = _loop(model, train_set, cfg, start, optimizer, schedule, loss_and_grad, progress, pad_id, eos_id,
                       valid_set, save_path, meta, on_save)
    model.eval()
    return losses


def _loop(model, train_set, cfg, start, optimizer, schedule, loss_and_grad, progress, pad_id, eos_id, valid_set,
          save_path, meta, on_save):
    args = model.args
    losses = []
    C = args.canvas_length
    lengths = [canvases_needed(e, C) * C + len(e.prompt) for e in train_set]
    for step in range(start + 1, cfg.iters + 1):
        examples = [train_set[i] for i in batch_indices(lengths, cfg.batch_size, step - 1, cfg.seed)]
        batch = make_batch(examples, args, pad_id, eos_id)
        rng = np.random.default_rng([cfg.seed, step, 1])
        noise = draw_noise(rng, batch, args.vocab_size, args.canvas_length, cfg.t_min, cfg.sc_prob)
        mx.random.seed(int(rng.integers(0, 2**31)))  # LoRA dropout
        (loss, _, _), grads = loss_and_grad(model, batch, noise)
        if cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: the loss is {value}; lower --learning-rate or check the data")
        losses.append(value)
        extra = ""
        if valid_set and cfg.steps_per_eval and (step % cfg.steps_per_eval == 0 or step == cfg.iters):
            model.eval()
            extra = f" | val {evaluate(model, valid_set, cfg, pad_id, eos_id):.4f}"
            model.train()
        if progress is not None:
            lr = schedule(step - 1) if callable(schedule) else schedule
            progress.update(step, value, batch.tokens, float(lr), extra)
            if extra and not progress.tty and step % progress.every:
                progress.note(f"step {step}:{extra.lstrip(' |')}")
        if save_path is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
            folder = save_checkpoint(save_path, step, model, optimizer, meta)
            if on_save is not None:
                on_save(step)
            if progress is not None:
                progress.note(f"[INFO] Saved checkpoint {folder}")
    return losses


# --- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.train",
        description="Fine-tune a DiffusionGemma (LoRA or full) with the block-diffusion objective.",
    )
    p.add_argument("--model", required=True, help="Model folder or Hugging Face repo id.")
    p.add_argument("--data", required=True, help="Folder with train.jsonl (and valid.jsonl), or one .jsonl file.")
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora")
    p.add_argument("--from-scratch", action="store_true",
                   help="Ignore any weights in --model: start from random weights built from its config.json.")
    p.add_argument("--save-path", help="Where the adapters (lora) or the model (full) go. "
                                       "Default: adapters / trained_model.")
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --save-path.")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, help="Default: 1e-4 (lora), 1e-5 (full).")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="Linear warm-up steps.")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="Clip the gradient norm (0: off).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-layers", type=int, default=-1, help="Adapt the last N layers (-1: all).")
    p.add_argument("--lora-keys", nargs="+", help="Linear layers to adapt. Default: attention q/k/v/o and the dense MLP.")
    p.add_argument("--max-canvases", type=int, default=4, help="Most canvases an answer may span.")
    p.add_argument("--max-seq-length", type=int, default=4096, help="Most tokens per example (prompt + canvases).")
    p.add_argument("--no-chat-template", action="store_true", help="Use prompts as plain text (prompt/completion data).")
    p.add_argument("--sc-prob", type=float, default=0.5, help="Share of examples trained with self-conditioning.")
    p.add_argument("--t-min", type=float, default=0.001, help="Smallest corruption level.")
    p.add_argument("--ar-weight", type=float, default=1.0, help="Weight of the encoder's autoregressive loss.")
    p.add_argument("--steps-per-report", type=int, default=10)
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps (0: only at the end).")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved model (full fine-tuning). Default: the training dtype.")
    return p


def run(argv=None) -> Path:
    from .convert import resolve_checkpoint
    from .lora import DEFAULT_KEYS, apply_lora, save_adapters
    from .tokenizer import load_tokenizer
    from .weights import DTYPE_NAMES

    a = build_parser().parse_args(argv)
    folder = resolve_checkpoint(a.model)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise DataError(f"{folder}: has no tokenizer.json; training needs the model's tokenizer")
    args = ModelArgs.from_file(folder / "config.json")
    train_path, valid_path = data_files(Path(a.data))
    train_set = load_examples(train_path, tokenizer, not a.no_chat_template)
    check_budget(train_set, train_path, args.canvas_length, a.max_canvases, a.max_seq_length)
    valid_set = None
    if valid_path is not None:
        valid_set = load_examples(valid_path, tokenizer, not a.no_chat_template)
        check_budget(valid_set, valid_path, args.canvas_length, a.max_canvases, a.max_seq_length)

    model = build_model(folder, a.from_scratch, a.seed)
    eos_ids = model.sampler_defaults.eos_token_ids or args.eos_token_ids
    if not eos_ids:
        raise DataError(f"{folder}: no EOS id in generation_config.json or config.json; the EOS fill needs one")
    eos_id = eos_ids[0]
    pad_id = args.pad_token_id if args.pad_token_id is not None else 0

    save_path = Path(a.save_path or ("adapters" if a.fine_tune_type == "lora" else "trained_model"))
    lora_config = None
    if a.fine_tune_type == "lora":
        if a.from_scratch:
            raise ValueError("--from-scratch trains every weight: use --fine-tune-type full")
        keys = a.lora_keys or list(DEFAULT_KEYS)
        lora_config = {"rank": a.lora_rank, "scale": a.lora_scale, "dropout": a.lora_dropout, "keys": keys,
                       "num_layers": a.lora_layers}
        mx.random.seed(a.seed)
        n = apply_lora(model, a.lora_rank, a.lora_scale, a.lora_dropout, keys, a.lora_layers)
        print(f"[INFO] LoRA on {n} linear layers (rank {a.lora_rank}); router, experts and the rest frozen")
    else:
        if any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
            raise ValueError("full fine-tuning needs float weights; this model is quantized (use LoRA, or convert "
                             "with --dequantize first)")
        model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                              model.parameters()))
        for layer in model.layers:
            layer.freeze(keys=list(FROZEN_BUFFERS), recurse=False)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[INFO] Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"[INFO] {len(train_set)} training examples" + (f", {len(valid_set)} validation" if valid_set else ""))

    lr = a.learning_rate if a.learning_rate is not None else (1e-4 if a.fine_tune_type == "lora" else 1e-5)
    cfg = TrainConfig(
        iters=a.iters, batch_size=a.batch_size, learning_rate=lr, lr_schedule=a.lr_schedule, warmup=a.warmup,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip or None, seed=a.seed, t_min=a.t_min, sc_prob=a.sc_prob,
        ar_weight=a.ar_weight, steps_per_report=a.steps_per_report, steps_per_eval=a.steps_per_eval,
        val_batches=a.val_batches, save_every=a.save_every,
    )
    meta = {"fine_tune_type": a.fine_tune_type}
    save_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(model, train_set, cfg, pad_id=pad_id, eos_id=eos_id, valid_set=valid_set, save_path=save_path,
          resume=a.resume, meta=meta)
    print(f"[INFO] Trained {cfg.iters} steps in {time.perf_counter() - start:.1f} s")
    if lora_config is not None:
        save_adapters(model, save_path, lora_config)
        print(f"[INFO] Saved adapters to {save_path} (load with mlx_dgemma.load(model, adapter_path=...))")
    else:
        save_model(model, folder, save_path, DTYPE_NAMES[a.save_dtype] if a.save_dtype else None)
        print(f"[INFO] Saved the model to {save_path}")
    return save_path


def main(argv=None):
    try:
        run(argv)
        return 0
    except (DataError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted (resume with --resume from the last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
