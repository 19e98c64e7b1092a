"""Multi-turn chat: `ChatSession`, the API an app calls (the terminal REPL is `chat.py`).

    session = ChatSession(model, tokenizer, system_prompt="Be brief.", think=True)
    reply = session.send("Why is the sky blue?")       # reply.text, reply.reasoning, reply.finish_reason
    for chunk in session.stream("And at sunset?", drafts=True):
        ...                                             # chunk.draft / chunk.reasoning / chunk.text / chunk.reply
    session.cancel()                                    # from any thread: stops within one denoising step

How the cache is reused across turns. The cache holds exactly the tokens the chat template renders for the
conversation so far, and the session keeps the list of those ids (`cached_tokens`). A turn renders the whole
conversation plus the generation prompt, keeps the part of the cache that is a prefix of it and encodes only the
rest. While encoding the prompt it takes snapshots (references to the cache's immutable arrays, so they cost no
copy) where the next turn's rendering is expected to part from this one: after the user turn, and after the
model-turn header that a re-rendered reply will start with. Once the reply is in, the conversation is rendered
again (the template strips the reasoning, and re-tokenizing the text need not give the generated ids back) and
the cache is rolled back to the longest snapshot that is still a prefix of that rendering; the canvases diffusion
encoded are dropped. The next turn then encodes the reply as rendered plus the new user turn. When the rendering
does not extend the kept prefix (thinking switched, a new system prompt), the conversation is encoded afresh.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from .config import DEFAULT_PREFILL_STEP, SAMPLER_FLAGS
from .diffusion import RandomSource, prefill, prefill_chunks, resolve_settings
from .reasoning import THOUGHT_CLOSE, THOUGHT_OPEN, ChannelSplitter, display_draft, split_reasoning
from .text_generation import stream_generate
from .vision.conversation import ConversationImages

__all__ = ["ChatSession", "ChatChunk", "Reply"]

# With thinking on, the default budget is this many times the model's max_new_tokens (one canvas for the released
# model), so that a thought channel that fills a canvas leaves room for the answer.
THINKING_BUDGET_FACTOR = 4

# A reply text used only to find where a re-rendered model turn starts (never shown, never encoded).
_PROBE_REPLY = "OK"


@dataclass
class Reply:
    """One model turn. `text` is the answer (reasoning removed); when it is empty, `note` says why."""

    text: str
    reasoning: str = ""
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (token budget), "cancelled"
    note: str | None = None
    tokens: list[int] = field(default_factory=list)  # the generated ids kept (end-of-turn id included)
    prompt_tokens: int = 0  # tokens encoded for this turn's prompt
    reused_tokens: int = 0  # tokens of the prompt already in the cache
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    tokens_per_forward: float = 0.0
    denoising_steps: int = 0
    canvases: int = 0

    def __str__(self):
        return self.text

    def stats_line(self) -> str:
        """mlx-lm's chat statistics line, plus diffusion's tokens per forward."""
        # a turn whose whole prompt was already in the cache encoded nothing: no rate to show
        prompt = f"prompt {self.prompt_tps:.1f} tok/s" if self.prompt_tokens else "prompt cached"
        return (f"{self.generation_tokens} tokens · {self.generation_tps:.1f} tok/s · {prompt} · "
                f"peak {self.peak_memory:.2f} GB · {self.tokens_per_forward:.2f} tokens/forward")


@dataclass
class ChatChunk:
    """What `ChatSession.stream` yields: a draft of the current canvas, newly committed reasoning and answer text,
    or (last) the finished `reply`."""

    text: str = ""  # new answer text
    reasoning: str = ""  # new reasoning text
    draft: str | None = None  # the whole current canvas, as text (drafts only)
    canvas_index: int = 0
    step: int = 0
    reply: Reply | None = None

    @property
    def is_draft(self) -> bool:
        return self.draft is not None


class _Cancelled(Exception):
    pass


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """A conversation with a DiffusionGemma model that keeps its KV cache between turns.

    `sampler` takes the diffusion settings (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`,
    `stability_threshold`, `confidence_threshold`, `sampler` "reference" or "fast", `fast_sampler` a
    FastSamplerConfig); unset ones come from the model's generation_config.json.
    `max_tokens` is the budget of one reply, reasoning included (default: the model's `max_new_tokens`, times
    `THINKING_BUDGET_FACTOR` with thinking on). `seed` makes the whole conversation reproducible. A turn may carry
    images (`send(text, images=[...])`, for a model with a vision tower); they stay in the history, and
    `max_soft_tokens` sets their soft-token budget (default: the folder's processor config).

    One turn runs at a time, on any thread (a new worker per turn is fine; MLX gives each thread its own streams,
    so a worker thread should call `mx.clear_streams()` before it ends). `cancel()` may be called from any thread.
    """

    def __init__(self, model, tokenizer, system_prompt: str | None = None, think: bool = False, *,
                 max_tokens: int | None = None, seed: int | None = None,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, history: list[dict] | None = None,
                 max_soft_tokens: int | None = None, **sampler):
        if tokenizer is None or not tokenizer.has_chat_template:
            raise ValueError("a chat needs a tokenizer with a chat template; this model folder has none")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if prefill_step_size <= 0:
            raise ValueError(f"prefill_step_size must be positive, got {prefill_step_size}")
        self.model = model
        self.tokenizer = tokenizer
        # MLX evaluates a lazy array on the stream of the thread that built it, and a model's non-parameter arrays
        # (RoPE periods) may still be lazy after loading: evaluate them, so that turns may run on any thread.
        if isinstance(getattr(model, "state", None), dict):
            mx.eval(model.state)
        self.system_prompt = system_prompt
        self.think = bool(think)
        self.max_tokens = max_tokens
        self.prefill_step_size = prefill_step_size
        self.sampler: dict = {}
        self.update_sampler(**sampler)
        self.seed = seed
        self._messages: list[dict] = []  # user and model turns as rendered (model turns: raw text, reasoning kept)
        for m in history or []:
            if m.get("role") not in ("user", "assistant", "model") or not isinstance(m.get("content"), str):
                raise ValueError(f"history entries need a user/assistant role and text content, got {m!r}")
            self._messages.append({"role": m["role"], "content": m["content"]})
        self.max_soft_tokens = max_soft_tokens
        self._images = ConversationImages(model, max_soft_tokens)
        self._cache = None
        self._cached: list[int] = []  # the ids the cache holds
        self._lock = threading.Lock()
        self._running = False
        self._stop: threading.Event | None = None

    # --- settings ------------------------------------------------------------------------------------------

    @property
    def seed(self) -> int | None:
        return self._seed

    @seed.setter
    def seed(self, seed: int | None):
        """A new random source; the same seed and the same turns give the same replies."""
        self._seed = seed
        self._rng = RandomSource(seed)

    def update_sampler(self, **overrides):
        """Change diffusion settings for the next turns (None restores the model's default); raises ValueError
        for a bad value, TypeError for an unknown setting."""
        merged = {**self.sampler, **overrides}
        resolve_settings(self.model, merged)  # validates
        self.sampler = {k: v for k, v in merged.items() if v is not None}

    def settings(self):
        """The sampler settings the next turn will use (`max_new_tokens` is the reply's budget)."""
        base = resolve_settings(self.model, self.sampler)
        budget = self.max_tokens
        if budget is None:
            budget = base.max_new_tokens * (THINKING_BUDGET_FACTOR if self.think else 1)
        return base.updated(max_new_tokens=budget)

    # --- conversation --------------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict]:
        """The turns so far (system prompt not included): `{"role": "user", "content": ...}` and
        `{"role": "assistant", "content": answer, "reasoning": reasoning}`."""
        out = []
        for m in self._messages:
            if m["role"] == "user":
                out.append(dict(m))
            else:
                reasoning, answer = split_reasoning(m["content"])
                out.append({"role": "assistant", "content": answer, "reasoning": reasoning})
        return out

    @property
    def cached_tokens(self) -> list[int]:
        """The token ids the KV cache holds (always a prefix of the rendered conversation)."""
        return list(self._cached)

    @property
    def cache(self):
        return self._cache

    @property
    def running(self) -> bool:
        return self._running

    def messages(self, text: str | None = None, images: list[dict] | None = None) -> list[dict]:
        """The messages the chat template renders: system prompt, the turns so far, `text` as the next user turn
        (after its image parts, if any)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        content = [*images, {"type": "text", "text": text}] if images else text
        user = [{"role": "user", "content": content}] if text is not None else []
        return system + [dict(m) for m in self._messages] + user

    def render(self, text: str | None = None, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation (plus `text` as the next user turn) through the chat template, with
        the session's thinking setting: with `add_generation_prompt`, the prompt the next turn feeds the model."""
        return self._render(self.messages(text), add_generation_prompt)

    def _render(self, messages, add_generation_prompt):
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=self.think
        )
        return self._images.expand(ids, messages)  # image placeholders -> their soft tokens

    def reset(self):
        """Forget the conversation (system prompt and settings stay)."""
        with self._lock:
            if self._running:
                raise RuntimeError("cannot reset while a reply is being generated; cancel() it first")
            self._messages = []
            self._images.forget()
            self._cache, self._cached = None, []

    def cancel(self):
        """Stop the running turn within one denoising step (safe from any thread; a no-op when idle). The text of
        the canvases committed so far is kept as the reply; a turn stopped before its first canvas is dropped."""
        stop = self._stop
        if stop is not None:
            stop.set()

    # --- turns ---------------------------------------------------------------------------------------------

    def send(self, text: str, on_draft: Callable[[str], None] | None = None, images: list | None = None) -> Reply:
        """Send a user message (with `images`: paths, bytes, data: URLs or PIL images) and return the model's
        reply; `on_draft(text)` is called with the current canvas after every denoising step."""
        reply = None
        for chunk in self.stream(text, drafts=on_draft is not None, images=images):
            if chunk.is_draft:
                on_draft(chunk.draft)
            if chunk.reply is not None:
                reply = chunk.reply
        return reply

    def stream(self, text: str, drafts: bool = False, images: list | None = None) -> Iterator[ChatChunk]:
        """Send a user message and stream the reply: committed reasoning/answer text a canvas at a time, drafts
        after every denoising step with `drafts=True`, and last a chunk carrying the `Reply`. Closing the
        iterator early abandons the turn (it is left out of the history)."""
        if not isinstance(text, str):
            raise TypeError(f"a message is text, got {type(text).__name__}")
        parts = self._images.parts(images) if images else []  # read now: a bad image fails before the turn
        with self._lock:
            if self._running:
                raise RuntimeError("a reply is already being generated in this session")
            self._running = True
            self._stop = threading.Event()
        try:
            reply = yield from self._turn(text, parts, drafts, self._stop)
        finally:
            # MLX evaluates a lazy array on the stream of the thread that built it: leave nothing lazy behind, so
            # the next turn may run on another thread (an app's worker).
            key = getattr(self._rng, "key", None)
            if isinstance(key, mx.array):
                mx.eval(key)
            with self._lock:
                self._running, self._stop = False, None
        yield ChatChunk(reply=reply)  # the turn is over: a new one may start while this is being read

    def _image_marker_ids(self) -> set[int]:
        vision = getattr(self.model, "vision", None)
        return set() if vision is None else {vision.boi_token_id, vision.image_token_id, vision.eoi_token_id}

    def _encode(self, prompt: list[int], start: int, end: int, images, stop: threading.Event):
        """Encode `prompt[start:end]` in chunks (none cutting an image), checking for a cancel between them."""
        images = None if images is None else images.columns(start, end)
        ids = prompt[start:end]
        for s, e in prefill_chunks(len(ids), self.prefill_step_size, images):
            if stop.is_set():
                raise _Cancelled
            chunk_images = None if images is None else images.columns(s, e)
            prefill(self.model, mx.array([ids[s:e]]), self._cache, None, e - s, chunk_images)
            self._cached.extend(ids[s:e])

    def _turn(self, text: str, parts: list[dict], drafts: bool, stop: threading.Event):
        """Yields the turn's chunks and returns its `Reply`."""
        settings = self.settings()
        messages = self.messages(text, parts)
        prompt = self._render(messages, True)
        images = self._images.prompt_images(prompt, messages, settings.max_new_tokens)
        points = self._snapshot_points(messages, prompt)
        if self._cache is None:
            self._cache = self.model.make_cache()
        start_state, start_tokens = self._cache.snapshot(), list(self._cached)
        if prompt[:len(self._cached)] != self._cached:  # the kept prefix is stale: start over
            self._cache, self._cached = self.model.make_cache(), []
        reused = len(self._cached)
        snapshots = [(reused, self._cache.snapshot())]
        self._messages.append(messages[-1])
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        kept, last, cancelled = [], None, False
        splitter = ChannelSplitter()
        try:
            for point in [*points, len(prompt)]:
                if point > len(self._cached):
                    self._encode(prompt, len(self._cached), point, images, stop)
                    snapshots.append((point, self._cache.snapshot()))
            prompt_seconds = time.perf_counter() - t0
            prefill_peak = mx.get_peak_memory()
            if stop.is_set():
                raise _Cancelled
            eos = set(settings.eos_token_ids)
            for r in stream_generate(
                self.model, self.tokenizer, [], settings.max_new_tokens, drafts=drafts, cache=self._cache,
                should_stop=stop.is_set, rng=self._rng, **{k: getattr(settings, k) for k in SAMPLER_FLAGS},
            ):
                if r.is_draft:
                    yield ChatChunk(draft=display_draft(r.draft_text), canvas_index=r.canvas_index, step=r.step)
                    continue
                if stop.is_set() and r.finish_reason is None:
                    cancelled = True  # this canvas was interrupted: a half-denoised draft, not text
                    break
                kept.extend(r.tokens)
                last = r
                new_reasoning, new_text = splitter.add(r.text)
                if new_reasoning or new_text:
                    yield ChatChunk(text=new_text, reasoning=new_reasoning, canvas_index=r.canvas_index, step=r.step)
            # A cancel that lands between a committed canvas and the next one's first step ends the stream
            # without a final response: that turn was stopped too, not finished.
            cancelled = cancelled or (stop.is_set() and (last is None or last.finish_reason is None))
            if not kept and cancelled:
                raise _Cancelled
            # A model turn carries no images: image markers it wrote would be read back as placeholders.
            dropped = eos | self._image_marker_ids()
            raw = self.tokenizer.decode([t for t in kept if t not in dropped])
            self._messages.append({"role": "assistant", "content": raw})
            # Roll the cache back to the longest snapshot the re-rendered conversation still starts with.
            rendered = self._render(self.messages(), False)
            n, state = max(((n, s) for n, s in snapshots if prompt[:n] == rendered[:n]), key=lambda x: x[0],
                           default=(0, None))
            if state is None:
                self._cache, self._cached = self.model.make_cache(), []
            else:
                self._cache.restore(state)
                self._cached = prompt[:n]
        except _Cancelled:
            self._rollback(start_state, start_tokens)
            return Reply(text="", finish_reason="cancelled", note="stopped before the first canvas was committed",
                         reused_tokens=reused)
        except BaseException:
            self._rollback(start_state, start_tokens)
            raise
        reasoning, answer = split_reasoning(raw)
        finish = "cancelled" if cancelled else last.finish_reason or "length"
        encoded = len(prompt) - reused
        return Reply(
            text=answer, reasoning=reasoning, finish_reason=finish, note=self._why_empty(answer, raw, finish, settings),
            tokens=kept, prompt_tokens=encoded, reused_tokens=reused,
            prompt_tps=encoded / prompt_seconds if encoded and prompt_seconds > 0 else 0.0,
            generation_tokens=last.generation_tokens, generation_tps=last.generation_tps,
            peak_memory=max(prefill_peak / 1e9, last.peak_memory), tokens_per_forward=last.tokens_per_forward,
            denoising_steps=last.denoising_steps, canvases=last.canvases,
        )

    def _snapshot_points(self, messages, prompt) -> list[int]:
        """Where the next turn's rendering is expected to part from this prompt: after the user turn, and after
        the header of the model turn that the reply will be re-rendered into."""
        probe = messages + [{"role": "assistant", "content": _PROBE_REPLY}]
        return sorted({_common_prefix(prompt, self._render(messages, False)),
                       _common_prefix(prompt, self._render(probe, False))})

    def _rollback(self, state, tokens):
        """Undo a turn: the user message goes, the cache is as it was."""
        if self._messages and self._messages[-1]["role"] == "user":
            self._messages.pop()
        if self._cache is None:
            self._cache = self.model.make_cache()
        self._cache.restore(state)
        self._cached = tokens

    def _why_empty(self, answer: str, raw: str, finish: str, settings) -> str | None:
        if answer:
            return None
        thinking = raw.rfind(THOUGHT_OPEN) > raw.rfind(THOUGHT_CLOSE)  # an unclosed thought channel
        if finish == "cancelled":
            return "stopped before the answer began"
        if finish == "length" and thinking:
            return (f"the token budget ({settings.max_new_tokens} tokens) ran out while the model was still "
                    "thinking; raise max_tokens (--max-tokens)")
        if finish == "length":
            return f"the token budget ({settings.max_new_tokens} tokens) ran out before the model wrote an answer"
        if thinking:
            return "the model ended its turn while still thinking, without an answer"
        if raw.strip():
            return "the model wrote only reasoning, no answer"
        return "the model ended its turn without writing anything"
