"""The block-diffusion loop, as the reference's `generate` runs it, and the token API over it.

`diffuse` owns the cache and the random source; the model knows nothing of sampling and the sampler math
(`sampler.py`) knows nothing of the model. Each denoising step is built as one lazy graph and evaluated once; the
only host read per step is the stop check (plus the draft canvas, when the caller asked for drafts, read in the
same synchronisation).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from . import backend, cpu
from .config import DEFAULT_PREFILL_STEP, FastSamplerConfig, SamplerConfig
from .fast_loop import StepWork, fast_canvas
from .vision import prepare_images
from .sampler import (
    CanvasStatistics,
    canvas_statistics,
    confident,
    entropy_bound_accept,
    finalize_canvas,
    renoise,
    stable,
    temperature,
    tokens_per_forward,
)


# --- randomness ------------------------------------------------------------------------------------------------


class RandomSource:
    """The sampler's randomness: the starting canvas, one uniform per position for sampling, re-noising tokens.

    Seeded, it makes a generation reproducible. Tests substitute a source that replays the reference's draws.
    """

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self.key = mx.random.key(seed)

    def _key(self):
        self.key, key = mx.random.split(self.key)
        return key

    def canvas(self, shape, vocab_size: int) -> mx.array:
        return mx.random.randint(0, vocab_size, shape, key=self._key())

    def uniforms(self, shape) -> mx.array:
        return mx.random.uniform(shape=shape, key=self._key())

    def noise(self, shape, vocab_size: int) -> mx.array:
        return mx.random.randint(0, vocab_size, shape, key=self._key())

    def replace_sample(self, sample: mx.array) -> mx.array:
        return sample


# --- the loop --------------------------------------------------------------------------------------------------


@dataclass
class Draft:
    """The argmax canvas after one denoising step (tokens only when drafts were requested)."""

    canvas_index: int
    step: int  # 1-based count of steps run in this canvas
    tokens: list[list[int]] | None


@dataclass
class Canvas:
    """A finished canvas, after the EOS/pad rules; `finished` rows have produced an end-of-generation id."""

    canvas_index: int
    tokens: np.ndarray  # [B, C]
    finished: np.ndarray  # [B]
    steps: int


@dataclass
class DiffusionStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    passes: np.ndarray | None = None  # decoder passes per row (rows that stopped early do not count)
    tokens_per_forward: np.ndarray | None = None  # per row: non-pad canvas tokens / decoder passes
    position_visits: np.ndarray | None = None  # per row: decoder positions computed, all steps and canvases
    step_shapes: list[int] | None = None  # the fast sampler: positions each step ran through the decoder
    steps: int = 0  # denoising steps run, all canvases
    canvases: int = 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[mx.array, mx.array | None]:
    """A `[B, L]` batch, left-padded, and its token mask (None when nothing is padded)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), length), dtype=bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = True
    return mx.array(ids), (None if mask.all() else mx.array(mask))


def prefill_chunks(length: int, step: int, images=None) -> list[tuple[int, int]]:
    """Column ranges of about `step` for encoding a prompt; with `images`, none cuts an image block."""
    if images is not None:
        return images.chunks(length, step)
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def prefill(model, ids: mx.array, cache, mask: mx.array | None = None, step: int = DEFAULT_PREFILL_STEP, images=None):
    """Encode a prompt in chunks, so peak memory grows with the chunk rather than the prompt. With `images`
    (`vision.PromptImages`) no chunk cuts an image's block of soft tokens."""
    for start, stop in prefill_chunks(ids.shape[1], step, images):
        chunk_mask = None if mask is None else mask[:, start:stop]
        chunk_images = None if images is None else images.columns(start, stop)
        extra = {} if chunk_images is None else {"images": chunk_images}  # text prompts call encode as before
        model.encode(ids[:, start:stop], cache, attention_mask=chunk_mask, **extra)
        mx.eval(cache.state())


_compiled_statistics = mx.compile(canvas_statistics)


def _statistics(*args):
    # On the CPU the sampler's exp and tanh are compiled kernels around a bit-cast already; an enclosing compile
    # would only slow them down.
    return (canvas_statistics if cpu.use_fast_math() else _compiled_statistics)(*args)


def lane_statistics(logits, temp, uniforms, softcap, dtype) -> CanvasStatistics:
    """`canvas_statistics` for each chunk of canvas positions on its lane's stream (see `cpu.map_positions`).

    The per-position results are joined; the vocabulary-sized weights stay a list of position chunks, cast to
    the model's dtype (the soft embedding multiplies in it anyway), which `denoise_raw` takes as they are.
    """

    def chunk(rows):
        part = _statistics(logits[:, rows], temp, uniforms[:, rows], softcap)
        return part._replace(weights=part.weights.astype(dtype))

    parts = cpu.map_positions(logits.shape[1], chunk)
    if len(parts) == 1:
        return parts[0]._replace(weights=[parts[0].weights])
    return CanvasStatistics(
        [p.weights for p in parts], *(mx.concatenate(field, axis=1) for field in list(zip(*parts))[1:])
    )


def _keep_rows(done: mx.array, old, new):
    """Rows that already stopped keep their old values (arrays `[B, ...]`, or lists of position chunks)."""
    if isinstance(new, list):
        return [_keep_rows(done, o, n) for o, n in zip(old, new)]
    return mx.where(done.reshape(-1, *([1] * (new.ndim - 1))), old, new)


def _sync(*arrays):
    """The one evaluation per denoising step."""
    mx.eval(*arrays)


def _to_host(*arrays):
    """Read evaluated arrays on the host (the per-step stop check, and drafts when asked for)."""
    return [a.tolist() for a in arrays]


def _reference_canvas(model, cache, canvas, settings: SamplerConfig, rng: RandomSource, work: StepWork, *,
                      finished: mx.array, drafts: bool = False, should_stop: Callable[[], bool] | None = None,
                      rows_to_keep: Callable[[], list[int] | None] | None = None):
    """Denoise one canvas `[B, C]` as the reference does; yields (steps so far, draft tokens or None) after each
    step and returns (argmax canvas, steps). Every step computes all C positions of each row still running.

    `rows_to_keep` (a server's batch) is polled after every step: it returns the indices of the rows that go on
    when some leave (None when all stay); the others are dropped from this canvas, from the cache
    (`cache.select`) and from the random source (`rng.keep`), and the returned canvas has only the rows kept."""
    args = model.args
    (B, C), V = canvas.shape, args.vocab_size
    N, S = settings.max_denoising_steps, settings.stability_threshold
    argmax, weights, total, ent = canvas, None, None, None
    done = mx.zeros((B,), dtype=mx.bool_)
    history = mx.full((S, B, C), -1, dtype=mx.int32) if S else None
    steps = 0
    for step in range(N, 0, -1):
        running = (~(done | finished)).astype(mx.int32)
        work.passes, work.visits = work.passes + running, work.visits + C * running
        logits = model.denoise_raw(canvas, cache, weights, total)
        temp = mx.array(temperature(step, N, settings.t_min, settings.t_max), dtype=mx.float32)
        new = lane_statistics(logits, temp, rng.uniforms((B, C)), args.final_logit_softcapping, model.dtype)
        sample = rng.replace_sample(new.sample)
        accept = entropy_bound_accept(new.entropy, settings.entropy_bound)
        new_canvas = renoise(accept, sample, rng.noise((B, C), V))
        new_weights, new_argmax, new_total, new_ent = new.weights, new.argmax, new.total, new.entropy
        if B > 1 and weights is not None:  # rows that already stopped stay frozen
            new_argmax, new_canvas, new_weights, new_total, new_ent = (
                _keep_rows(done, old, fresh)
                for old, fresh in zip((argmax, canvas, weights, total, ent),
                                      (new_argmax, new_canvas, new_weights, new_total, new_ent))
            )
        is_stable, history = stable(history, new_argmax)
        done = done | (is_stable & confident(new_ent, settings.confidence_threshold))
        canvas, argmax, weights, total, ent = new_canvas, new_argmax, new_weights, new_total, new_ent
        all_done = mx.all(done)
        _sync(canvas, argmax, *weights, total, ent, done, work.passes, work.visits, all_done,
              *([history] if S else []))
        steps += 1
        host = _to_host(all_done, argmax) if drafts else _to_host(all_done)
        yield steps, (host[1] if drafts else None)
        rows = rows_to_keep() if rows_to_keep is not None else None
        if rows is not None:
            if not rows:
                return argmax[:0], steps
            B, kept = len(rows), mx.array(rows, dtype=mx.int32)
            canvas, argmax, total, ent, done, finished = (a[kept] for a in (canvas, argmax, total, ent, done, finished))
            weights, history = [w[kept] for w in weights], (history[:, kept] if S else None)
            work.passes, work.visits = work.passes[kept], work.visits[kept]
            cache.select(rows)
            rng.keep(rows)
            host[0] = bool(mx.all(done).item())
        if host[0] or (should_stop is not None and should_stop()):
            break
    return argmax, steps


def canvas_loop(settings: SamplerConfig):
    """The function that denoises one canvas under these settings: the reference's loop or the fast sampler's
    (`fast_loop.fast_canvas`). Same arguments, same protocol (see `_reference_canvas`)."""
    return fast_canvas if settings.sampler == "fast" else _reference_canvas


def diffuse(
    model,
    cache,
    batch_size: int,
    settings: SamplerConfig,
    rng: RandomSource,
    *,
    initial_canvas: mx.array | None = None,
    drafts: bool = False,
    should_stop: Callable[[], bool] | None = None,
    stats: DiffusionStats | None = None,
) -> Iterator[Draft | Canvas]:
    """Denoise canvas after canvas over an encoded prompt, as the reference's `generate` does (with
    `settings.sampler == "fast"`, each canvas by the fast sampler of `fast_loop.py`).

    Yields a `Draft` after every step and a `Canvas` when one is committed; the committed canvas is encoded into
    the cache before the next one starts (the last one is not encoded). `should_stop` is polled once per step.
    """
    args = model.args
    B, C, V = batch_size, args.canvas_length, args.vocab_size
    stats = stats if stats is not None else DiffusionStats()
    stats.passes = np.zeros(B, dtype=np.int64)
    finished = np.zeros(B, dtype=bool)
    max_length = cache.offset + settings.max_new_tokens
    n_canvases = math.ceil(settings.max_new_tokens / C)
    work = StepWork(mx.zeros((B,), dtype=mx.int32), mx.zeros((B,), dtype=mx.int32))
    denoise_canvas = canvas_loop(settings)
    committed = []

    for index in range(n_canvases):
        canvas = rng.canvas((B, C), V)  # drawn even when a canvas is given, as the reference does
        if index == 0 and initial_canvas is not None:
            canvas = initial_canvas
        steps_iter = denoise_canvas(model, cache, canvas, settings, rng, work, finished=mx.array(finished),
                                    drafts=drafts, should_stop=should_stop)
        while True:
            try:
                steps, draft = next(steps_iter)
            except StopIteration as end:
                argmax, steps = end.value
                break
            yield Draft(index, steps, draft)
        stats.steps += steps
        stats.canvases += 1
        tokens = np.array(argmax)
        tokens, finished = finalize_canvas(
            tokens, finished, settings.eos_token_ids, settings.pad_token_id,
            reached_max_length=cache.offset + C >= max_length,
        )
        stats.passes = np.array(work.passes, dtype=np.int64)
        stats.position_visits = np.array(work.visits, dtype=np.int64)
        stats.step_shapes = list(work.shapes) if settings.sampler == "fast" else None
        committed.append(tokens)
        stats.tokens_per_forward = tokens_per_forward(np.concatenate(committed, axis=1), stats.passes, settings.pad_token_id)
        yield Canvas(index, tokens, finished.copy(), steps)
        if finished.all() or index == n_canvases - 1 or (should_stop is not None and should_stop()):
            break
        model.encode(mx.array(tokens), cache)
        mx.eval(cache.state())


def resolve_settings(model, overrides: dict) -> SamplerConfig:
    base = getattr(model, "sampler_defaults", None) or SamplerConfig(
        eos_token_ids=model.args.eos_token_ids, pad_token_id=model.args.pad_token_id
    )
    return base.updated(**overrides)


def initial_canvas_ids(initial, batch: int, canvas_length: int, vocab: int, rng: RandomSource, tokenizer=None):
    """A first canvas from ids or text; shorter drafts are filled with uniform noise, as unfilled canvas is."""
    if initial is None:
        return None
    if isinstance(initial, str):
        if tokenizer is None:
            raise ValueError("a text initial_canvas needs a tokenizer")
        initial = tokenizer.encode(initial, add_special_tokens=False)
    rows = np.array(initial, dtype=np.int64)
    if rows.ndim == 1:
        rows = np.broadcast_to(rows, (batch, rows.shape[0]))
    if rows.shape[0] != batch:
        raise ValueError(f"initial_canvas has {rows.shape[0]} rows for a batch of {batch}")
    if rows.shape[1] > canvas_length:
        raise ValueError(f"initial_canvas has {rows.shape[1]} tokens but a canvas holds {canvas_length}")
    if rows.size and (rows.min() < 0 or rows.max() >= vocab):
        raise ValueError(f"initial_canvas holds ids outside the vocabulary [0, {vocab})")
    if rows.shape[1] < canvas_length:
        fill = np.array(rng.canvas((batch, canvas_length), vocab), dtype=np.int64)[:, rows.shape[1] :]
        rows = np.concatenate([rows, fill], axis=1)
    return mx.array(rows.astype(np.int32))


def cut_at_eos(tokens: list[int], eos_ids: list[int], limit: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first end-of-generation id, at most `limit` of them."""
    for i, t in enumerate(tokens[:limit]):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens[:limit], False


# --- token API -------------------------------------------------------------------------------------------------


def generate_tokens(
    model,
    prompts: list[list[int]],
    *,
    max_tokens: int | None = None,
    seed: int | None = None,
    max_denoising_steps: int | None = None,
    entropy_bound: float | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    stability_threshold: int | None = None,
    confidence_threshold: float | None = None,
    sampler: str | None = None,
    fast_sampler: FastSamplerConfig | None = None,
    eos_token_ids: list[int] | None = None,
    initial_canvas=None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    rng: RandomSource | None = None,
    stats: DiffusionStats | None = None,
    images: list[list] | None = None,
    max_soft_tokens: int | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts (left-padded together); per prompt, the new ids up to and
    including the first end-of-generation id, never more than `max_tokens`. `sampler` is "reference" (the
    reference's loop) or "fast" (`fast_loop.py`, with the levers `fast_sampler` switches). `eos_token_ids` (this
    call's end-of-generation ids; [] for none) wins over generation_config.json's and config.json's.

    `images` holds one list per prompt (paths, bytes, data: URLs or PIL images; empty for none), one per
    `<|image|>` placeholder id in that prompt, in order; `max_soft_tokens` overrides the folder's image budget."""
    settings = resolve_settings(model, dict(
        max_new_tokens=max_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
        t_max=t_max, stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
        sampler=sampler, fast_sampler=fast_sampler, eos_token_ids=eos_token_ids,
    ))
    rng = rng or RandomSource(seed)
    pad = settings.pad_token_id if settings.pad_token_id is not None else 0
    prompts, features = [list(p) for p in prompts], None
    if images is not None and any(images):
        prompts, features = prepare_images(model, prompts, images, max_soft_tokens=max_soft_tokens,
                                           max_new_tokens=settings.max_new_tokens)
    ids, mask = left_pad(prompts, pad)
    if ids.max().item() >= model.args.vocab_size or ids.min().item() < 0:
        raise ValueError(f"prompt ids must lie in [0, {model.args.vocab_size})")
    prompt_images = None if features is None else model.vision.prompt_images(np.array(ids), features)
    cache = model.make_cache()
    stats = stats if stats is not None else DiffusionStats()
    start = time.perf_counter()
    prefill(model, ids, cache, mask, prefill_step_size, prompt_images)
    stats.prompt_tokens, stats.prompt_seconds = ids.size, time.perf_counter() - start
    canvas = initial_canvas_ids(initial_canvas, ids.shape[0], model.args.canvas_length, model.args.vocab_size, rng)
    rows = [[] for _ in prompts]
    for event in backend.wired(model, diffuse(model, cache, ids.shape[0], settings, rng, initial_canvas=canvas,
                                              stats=stats)):
        if isinstance(event, Canvas):
            for row, new in zip(rows, event.tokens.tolist()):
                row.extend(new)
    return [cut_at_eos(row, settings.eos_token_ids, settings.max_new_tokens)[0] for row in rows]


