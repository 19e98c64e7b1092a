"""The mlx-lm-style text API: `stream_generate` (committed text a canvas at a time, drafts on request) and
`generate` (the whole reply), over the loop in `diffusion.py`."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from . import backend
from .config import DEFAULT_PREFILL_STEP
from .diffusion import (
    Draft,
    DiffusionStats,
    RandomSource,
    cut_at_eos,
    diffuse,
    initial_canvas_ids,
    prefill,
    resolve_settings,
)
from .vision import prepare_images

__all__ = ["GenerationResponse", "generate", "print_stats", "prompt_ids", "stream_generate"]


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
    position_visits: int = 0  # decoder positions computed so far (all steps and canvases)
    denoising_steps: int = 0
    canvases: int = 0
    finish_reason: str | None = None  # "stop" (an end-of-generation id) or "length"

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None


def prompt_ids(tokenizer, prompt, *, system_prompt=None, enable_thinking=False, chat_template=True,
               n_images: int = 0) -> list[int]:
    """Token ids for a text prompt (through the chat template when there is one) or ids passed through. With
    `n_images`, the template places that many image placeholders before the text."""
    if not isinstance(prompt, str):
        return [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; this model folder has none (pass token ids instead)")
    if chat_template and tokenizer.has_chat_template:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}] if n_images else prompt
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": content}
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
    images: list | None = None,
    max_soft_tokens: int | None = None,
    **sampler_overrides,
) -> Iterator[GenerationResponse]:
    """Stream a generation: one response per committed canvas (and per step with `drafts=True`).

    `prompt` is text (rendered with the chat template unless `chat_template=False`) or token ids. Sampler
    settings (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`,
    `confidence_threshold`, `sampler` "reference" or "fast", `fast_sampler` a FastSamplerConfig, `eos_token_ids`)
    override the model's `generation_config.json` (and, for the EOS ids, `config.json`'s). A `cache` continues a
    conversation:
    the prompt is then only the new tokens.

    `images` (paths, bytes, data: URLs or PIL images) go before the text, placed by the chat template; a prompt
    given as ids or without the template must hold one `<|image|>` placeholder per image. `max_soft_tokens`
    (70/140/280/560/1120) overrides the folder's budget of soft tokens per image.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    settings = resolve_settings(model, {"max_new_tokens": max_tokens, **sampler_overrides})
    images = list(images or [])
    ids = prompt_ids(tokenizer, prompt, system_prompt=system_prompt, enable_thinking=enable_thinking,
                     chat_template=chat_template, n_images=len(images))
    rng = rng or RandomSource(seed)
    cache = cache if cache is not None else model.make_cache()
    mx.reset_peak_memory()
    stats = DiffusionStats()
    start = time.perf_counter()
    prompt_images = None
    if images:
        (ids,), features = prepare_images(model, [ids], [images], max_soft_tokens=max_soft_tokens,
                                          max_new_tokens=settings.max_new_tokens, cached=len(cache))
        prompt_images = model.vision.prompt_images(np.array([ids]), features)
    prefill(model, mx.array([ids]), cache, None, prefill_step_size, prompt_images)
    stats.prompt_tokens, stats.prompt_seconds = len(ids), time.perf_counter() - start
    canvas = initial_canvas_ids(initial_canvas, 1, model.args.canvas_length, model.args.vocab_size, rng, tokenizer)
    detok = tokenizer.detokenizer() if tokenizer is not None else None
    emitted, gen_start = 0, time.perf_counter()

    def response(**kw):
        elapsed = max(time.perf_counter() - gen_start, 1e-9)
        tpf = stats.tokens_per_forward[0] if stats.tokens_per_forward is not None else 0.0
        visits = int(stats.position_visits[0]) if stats.position_visits is not None else 0
        return GenerationResponse(
            prompt_tokens=stats.prompt_tokens, prompt_tps=stats.prompt_tokens / max(stats.prompt_seconds, 1e-9),
            generation_tokens=emitted, generation_tps=emitted / elapsed, peak_memory=mx.get_peak_memory() / 1e9,
            tokens_per_forward=float(tpf), position_visits=visits, denoising_steps=stats.steps, canvases=stats.canvases, **kw,
        )

    for event in backend.wired(model, diffuse(model, cache, 1, settings, rng, initial_canvas=canvas, drafts=drafts,
                                              should_stop=should_stop, stats=stats)):
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
    per_token = r.position_visits / max(r.generation_tokens, 1)
    canvases = f"{r.canvases} canvas" + ("" if r.canvases == 1 else "es")
    print(f"Diffusion: {canvases}, {r.denoising_steps} steps, {r.tokens_per_forward:.2f} tokens/forward, "
          f"{per_token:.1f} visits/token", file=file)


