"""Block-diffusion generation: the reference's loop, a token API, an mlx-lm-style text API and the command line.

    python -m mlx_dgemma.generate --model PATH -p "Why is the sky blue?"

The loop (`diffuse`) owns the cache and the random source; the model knows nothing of sampling and the sampler
math (`sampler.py`) knows nothing of the model. Each denoising step is built as one lazy graph and evaluated once;
the only host read per step is the stop check (plus the draft canvas, when the caller asked for drafts, read in
the same synchronisation).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from . import cpu
from .config import SamplerConfig
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

DEFAULT_PREFILL_STEP = 2048


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


def prefill(model, ids: mx.array, cache, mask: mx.array | None = None, step: int = DEFAULT_PREFILL_STEP):
    """Encode a prompt in chunks, so peak memory grows with the chunk rather than the prompt."""
    for start in range(0, ids.shape[1], step):
        chunk_mask = None if mask is None else mask[:, start : start + step]
        model.encode(ids[:, start : start + step], cache, attention_mask=chunk_mask)
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
    """Denoise canvas after canvas over an encoded prompt, as the reference's `generate` does.

    Yields a `Draft` after every step and a `Canvas` when one is committed; the committed canvas is encoded into
    the cache before the next one starts (the last one is not encoded). `should_stop` is polled once per step.
    """
    args = model.args
    B, C, V = batch_size, args.canvas_length, args.vocab_size
    N, S = settings.max_denoising_steps, settings.stability_threshold
    stats = stats if stats is not None else DiffusionStats()
    stats.passes = np.zeros(B, dtype=np.int64)
    finished = np.zeros(B, dtype=bool)
    max_length = cache.offset + settings.max_new_tokens
    n_canvases = math.ceil(settings.max_new_tokens / C)
    passes = mx.zeros((B,), dtype=mx.int32)
    committed = []

    for index in range(n_canvases):
        canvas = rng.canvas((B, C), V)  # drawn even when a canvas is given, as the reference does
        if index == 0 and initial_canvas is not None:
            canvas = initial_canvas
        argmax, weights, total, ent = canvas, None, None, None
        done = mx.zeros((B,), dtype=mx.bool_)
        history = mx.full((S, B, C), -1, dtype=mx.int32) if S else None
        finished_now = mx.array(finished)
        steps = 0
        for step in range(N, 0, -1):
            passes = passes + (~(done | finished_now)).astype(mx.int32)
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
            _sync(canvas, argmax, *weights, total, ent, done, passes, all_done, *([history] if S else []))
            steps += 1
            host = _to_host(all_done, argmax) if drafts else _to_host(all_done)
            yield Draft(index, steps, host[1] if drafts else None)
            if host[0] or (should_stop is not None and should_stop()):
                break
        stats.steps += steps
        stats.canvases += 1
        tokens = np.array(argmax)
        tokens, finished = finalize_canvas(
            tokens, finished, settings.eos_token_ids, settings.pad_token_id,
            reached_max_length=cache.offset + C >= max_length,
        )
        stats.passes = np.array(passes, dtype=np.int64)
        committed.append(tokens)
        stats.tokens_per_forward = tokens_per_forward(np.concatenate(committed, axis=1), stats.passes, settings.pad_token_id)
        yield Canvas(index, tokens, finished.copy(), steps)
        if finished.all() or index == n_canvases - 1 or (should_stop is not None and should_stop()):
            break
        model.encode(mx.array(tokens), cache)
        mx.eval(cache.state())


def _resolve_settings(model, overrides: dict) -> SamplerConfig:
    base = getattr(model, "sampler_defaults", None) or SamplerConfig(
        eos_token_ids=model.args.eos_token_ids, pad_token_id=model.args.pad_token_id
    )
    return base.updated(**overrides)


def _initial_canvas(initial, batch: int, canvas_length: int, vocab: int, rng: RandomSource, tokenizer=None):
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
    initial_canvas=None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    rng: RandomSource | None = None,
    stats: DiffusionStats | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts (left-padded together); per prompt, the new ids up to and
    including the first end-of-generation id, never more than `max_tokens`."""
    settings = _resolve_settings(model, dict(
        max_new_tokens=max_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
        t_max=t_max, stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
    ))
    rng = rng or RandomSource(seed)
    pad = settings.pad_token_id if settings.pad_token_id is not None else 0
    ids, mask = left_pad([list(p) for p in prompts], pad)
    if ids.max().item() >= model.args.vocab_size or ids.min().item() < 0:
        raise ValueError(f"prompt ids must lie in [0, {model.args.vocab_size})")
    cache = model.make_cache()
    stats = stats if stats is not None else DiffusionStats()
    start = time.perf_counter()
    prefill(model, ids, cache, mask, prefill_step_size)
    stats.prompt_tokens, stats.prompt_seconds = ids.size, time.perf_counter() - start
    canvas = _initial_canvas(initial_canvas, ids.shape[0], model.args.canvas_length, model.args.vocab_size, rng)
    rows = [[] for _ in prompts]
    for event in diffuse(model, cache, ids.shape[0], settings, rng, initial_canvas=canvas, stats=stats):
        if isinstance(event, Canvas):
            for row, new in zip(rows, event.tokens.tolist()):
                row.extend(new)
    return [cut_at_eos(row, settings.eos_token_ids, settings.max_new_tokens)[0] for row in rows]


# --- text API --------------------------------------------------------------------------------------------------


@dataclass
class GenerationResponse:
    """What `stream_generate` yields: committed text (a canvas at a time) or, with `drafts=True`, drafts."""

    text: str  # newly committed text ("" for drafts)
    tokens: list[int]  # newly committed tokens
    is_draft: bool = False
    draft_text: str = ""  # the whole current canvas's argmax text (drafts only)
    step: int = 0  # denoising steps run in the current canvas
    canvas_index: int = 0
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    tokens_per_forward: float = 0.0
    denoising_steps: int = 0
    canvases: int = 0
    finish_reason: str | None = None  # "stop" (an end-of-generation id) or "length"

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None


def prompt_ids(tokenizer, prompt, *, system_prompt=None, enable_thinking=False, chat_template=True) -> list[int]:
    """Token ids for a text prompt (through the chat template when there is one) or ids passed through."""
    if not isinstance(prompt, str):
        return [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; this model folder has none (pass token ids instead)")
    if chat_template and tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return tokenizer.encode(text)


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int | None = None,
    *,
    drafts: bool = False,
    seed: int | None = None,
    system_prompt: str | None = None,
    enable_thinking: bool = False,
    chat_template: bool = True,
    initial_canvas=None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cache=None,
    should_stop: Callable[[], bool] | None = None,
    rng: RandomSource | None = None,
    **sampler_overrides,
) -> Iterator[GenerationResponse]:
    """Stream a generation: one response per committed canvas (and per step with `drafts=True`).

    `prompt` is text (rendered with the chat template unless `chat_template=False`) or token ids. Sampler
    settings (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`,
    `confidence_threshold`) override the model's `generation_config.json`. A `cache` continues a conversation:
    the prompt is then only the new tokens.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    settings = _resolve_settings(model, {"max_new_tokens": max_tokens, **sampler_overrides})
    ids = prompt_ids(tokenizer, prompt, system_prompt=system_prompt, enable_thinking=enable_thinking,
                     chat_template=chat_template)
    rng = rng or RandomSource(seed)
    cache = cache if cache is not None else model.make_cache()
    mx.reset_peak_memory()
    stats = DiffusionStats()
    start = time.perf_counter()
    prefill(model, mx.array([ids]), cache, None, prefill_step_size)
    stats.prompt_tokens, stats.prompt_seconds = len(ids), time.perf_counter() - start
    canvas = _initial_canvas(initial_canvas, 1, model.args.canvas_length, model.args.vocab_size, rng, tokenizer)
    detok = tokenizer.detokenizer() if tokenizer is not None else None
    emitted, gen_start = 0, time.perf_counter()

    def response(**kw):
        elapsed = max(time.perf_counter() - gen_start, 1e-9)
        tpf = stats.tokens_per_forward[0] if stats.tokens_per_forward is not None else 0.0
        return GenerationResponse(
            prompt_tokens=stats.prompt_tokens, prompt_tps=stats.prompt_tokens / max(stats.prompt_seconds, 1e-9),
            generation_tokens=emitted, generation_tps=emitted / elapsed, peak_memory=mx.get_peak_memory() / 1e9,
            tokens_per_forward=float(tpf), denoising_steps=stats.steps, canvases=stats.canvases, **kw,
        )

    for event in diffuse(model, cache, 1, settings, rng, initial_canvas=canvas, drafts=drafts,
                         should_stop=should_stop, stats=stats):
        if isinstance(event, Draft):
            if drafts:
                draft, _ = cut_at_eos(event.tokens[0], settings.eos_token_ids, len(event.tokens[0]))
                text = tokenizer.decode(draft) if tokenizer is not None else ""
                yield response(text="", tokens=[], is_draft=True, draft_text=text, step=event.step,
                               canvas_index=event.canvas_index)
            continue
        new, stopped = cut_at_eos(event.tokens[0].tolist(), settings.eos_token_ids, settings.max_new_tokens - emitted)
        emitted += len(new)
        last = stopped or emitted >= settings.max_new_tokens or bool(event.finished[0])
        text = ""
        if detok is not None:
            detok.add_tokens([t for t in new if t not in settings.eos_token_ids])
            if last:
                detok.finalize()
            text = detok.last_segment
        reason = ("stop" if stopped else "length") if last else None
        yield response(text=text, tokens=new, step=event.steps, canvas_index=event.canvas_index, finish_reason=reason)
        if last:
            return


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole reply as text; with `verbose`, prints it and mlx-lm's statistics lines."""
    if verbose:
        print("=" * 10)
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if last.is_draft:
            continue
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        if last is not None:
            print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=None):
    file = file or sys.stdout
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)
    print(f"Diffusion: {r.canvases} canvases, {r.denoising_steps} steps, {r.tokens_per_forward:.2f} tokens/forward",
          file=file)


# --- command line ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _str2bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_sampler_flags(p: argparse.ArgumentParser):
    """The diffusion flags shared by generate and chat; None means the model's generation_config.json."""
    p.add_argument("--steps", type=int, dest="max_denoising_steps", help="Denoising steps per canvas (default 48).")
    p.add_argument("--entropy-bound", type=float, help="Entropy bound for accepting tokens (default 0.1).")
    p.add_argument("--t-min", type=float, help="Temperature at the last step (default 0.4).")
    p.add_argument("--t-max", type=float, help="Temperature at the first step (default 0.8).")
    p.add_argument("--stability-threshold", type=int, help="Steps the argmax canvas must stay unchanged (default 1).")
    p.add_argument("--confidence-threshold", type=float, help="Mean entropy below which a canvas is done (default 0.005).")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=False, help="Thinking mode.")
    p.add_argument("--seed", type=int, help="Random seed (default: fresh noise each run).")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP, help="Prompt tokens per encoder chunk.")


SAMPLER_FLAGS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")


def load_for_cli(model_path: str | None, adapter_path: str | None = None):
    """The model named on the command line, or the bundled demo model (with a hint about the real one)."""
    from . import demo
    from .loading import load

    if model_path is None:
        if not demo.available():
            raise ValueError("no --model given and the bundled demo model is missing from this install")
        print(demo.RELEASED_MODEL_HINT, file=sys.stderr)
        model_path = str(demo.FOLDER)
    return load(model_path, adapter_path=adapter_path)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mlx_dgemma.generate", description="Generate text with a DiffusionGemma model.")
    p.add_argument("--model", help="MLX or Hugging Face folder, or Hub id. Default: the bundled demo model.")
    p.add_argument("--adapter-path", help="LoRA adapters to apply.")
    p.add_argument("--prompt", "-p", help="Prompt text, or - to read stdin.")
    p.add_argument("--system-prompt", help="System prompt for the chat template.")
    p.add_argument("--max-tokens", "-m", type=int, help="Maximum new tokens (default: the model's, 256).")
    p.add_argument("--ignore-chat-template", action="store_true", help="Feed the prompt as is.")
    p.add_argument("--initial-canvas", help="Start the first canvas from this text (edit in place).")
    p.add_argument("--show-canvas", action="store_true", help="Show the canvas settling, live.")
    p.add_argument("--verbose", type=_str2bool, default=True, help="Print statistics (true/false, default true).")
    add_sampler_flags(p)
    return p


def check_positive_flags(args):
    """The budget flags both command lines share, which argparse checks only for type."""
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.prefill_step_size <= 0:
        raise ValueError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")


def main(argv=None) -> int:
    from .display import CanvasView

    args = build_parser().parse_args(argv)
    try:
        check_positive_flags(args)
        model, tokenizer = load_for_cli(args.model, args.adapter_path)
        prompt = args.prompt
        if prompt == "-":
            prompt = sys.stdin.read()
        if prompt is None:
            from . import demo

            prompt = demo.DEFAULT_PROMPT if args.model is None else "hello"
        view = CanvasView() if args.show_canvas else None
        overrides = {k: getattr(args, k) for k in SAMPLER_FLAGS}
        last, started = None, False
        for last in stream_generate(
            model, tokenizer, prompt, args.max_tokens, drafts=view is not None and view.live, seed=args.seed,
            system_prompt=args.system_prompt, enable_thinking=args.think, chat_template=not args.ignore_chat_template,
            initial_canvas=args.initial_canvas, prefill_step_size=args.prefill_step_size, **overrides,
        ):
            if args.verbose and not started:
                print("=" * 10)  # once the prompt has been accepted
                started = True
            if last.is_draft:
                view.draft(last.draft_text)
            elif view is not None:
                view.commit(last.text)
            else:
                print(last.text, end="", flush=True)
        if view is not None:
            view.close()
        print()
        if args.verbose and last is not None:
            print("=" * 10)
            print_stats(last)
        return 0
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


FLAG_NAMES = {"max_denoising_steps": "--steps", "max_new_tokens": "--max-tokens", "entropy_bound": "--entropy-bound",
              "t_min": "--t-min", "t_max": "--t-max", "stability_threshold": "--stability-threshold",
              "confidence_threshold": "--confidence-threshold"}


def flag_message(error: Exception) -> str:
    """A sampler-setting error worded with the command-line flag the user typed."""
    message = str(error)
    field = message.split("=", 1)[0]
    return FLAG_NAMES[field] + message[len(field):] if field in FLAG_NAMES else message


class _CallableModule(types.ModuleType):
    """`mlx_dgemma.generate` is this module (for `python -m`) and also works as the `generate` function."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
