"""The async side of one generation: submit it, turn the scheduler's events into text pieces, notice a client
that went away, and write the request's log line. Both API shapes (OpenAI, Ollama) format what this yields."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .output import Delta, TextStream, prompt_opens_reasoning
from .errors import RequestError
from .request import GenerationRequest
from .scheduler import Handle, QueueFull

log = logging.getLogger("mlx_dgemma.server")

KEEPALIVE_SECONDS = 10.0


class Overloaded(RequestError):
    def __init__(self, retry_after: int):
        super().__init__("the server is at capacity (queue full); retry later", status=429, code="queue_full",
                         type="rate_limit_error")
        self.retry_after = retry_after


@dataclass
class Piece:
    kind: str  # "delta", "draft", "keepalive", "done", "error"
    delta: Delta = field(default_factory=Delta)
    text: str = ""  # a draft's text, or an error's message
    finish_reason: str | None = None


class Generation:
    """One request in flight. Iterate `pieces()`; afterwards `text`, `finish_reason` and `usage()` hold the result."""

    def __init__(self, state, route: str, request: GenerationRequest, raw: bool = False):
        self.state, self.route, self.request = state, route, request
        tokenizer = state.tokenizer
        eos = state.model.sampler_defaults.eos_token_ids if getattr(state.model, "sampler_defaults", None) else []
        self.text = TextStream(tokenizer, eos, request.stop,
                               in_reasoning=not raw and prompt_opens_reasoning(request.prompt_text), raw=raw)
        self.finish_reason: str | None = None
        self.stats: dict = {}
        self.started = time.perf_counter()
        self.first_text: float | None = None
        try:
            self.handle: Handle = state.scheduler.submit(request, asyncio.get_running_loop())
        except QueueFull:
            raise Overloaded(retry_after=max(1, state.retry_after)) from None

    async def pieces(self, keepalive: bool = False):
        """Text as it is committed; ends with a "done" or an "error" piece. Closing it early cancels the request."""
        try:
            while True:
                try:
                    event = await (asyncio.wait_for(self.handle.next(), KEEPALIVE_SECONDS) if keepalive
                                   else self.handle.next())
                except asyncio.TimeoutError:
                    yield Piece("keepalive")
                    continue
                if event.kind == "draft":
                    yield Piece("draft", text=self.state.tokenizer.decode(
                        [t for t in event.tokens if t not in self.text.eos]))
                elif event.kind == "tokens":
                    delta = self.text.add(event.tokens, final=event.final)
                    if delta:
                        self.first_text = self.first_text or time.perf_counter()
                        yield Piece("delta", delta=delta)
                    if self.text.stopped:
                        self.handle.cancel()
                        yield self._done("stop", {})
                        return
                elif event.kind == "done":
                    delta = self.text.add([], final=True)
                    if delta:
                        yield Piece("delta", delta=delta)
                    yield self._done(event.finish_reason, event.stats)
                    return
                else:
                    self.stats, self.finish_reason = event.stats, "error"
                    self._log("error: " + event.message)
                    yield Piece("error", text=event.message)
                    return
        finally:
            if self.finish_reason is None:  # closed early: the client went away
                self.handle.cancel()
                self._log("cancelled (client gone)")

    def _done(self, reason: str, stats: dict) -> Piece:
        if reason == "stop" and self.text.tool_calls:
            reason = "tool_calls"
        if reason == "cancelled":
            reason = "stop"
        self.finish_reason, self.stats = reason, stats or self.stats
        self._log(reason)
        return Piece("done", finish_reason=reason)

    async def collect(self, http_request=None) -> Piece:
        """Run to the end (non-streaming); a client that disconnects meanwhile cancels the request."""
        async def run():
            last = None
            async for piece in self.pieces():
                last = piece
            return last

        task = asyncio.ensure_future(run())
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and http_request is not None and await http_request.is_disconnected():
                task.cancel()
                self.handle.cancel()
                raise asyncio.CancelledError
        return task.result()

    def usage(self) -> dict:
        prompt = len(self.request.prompt_ids)
        completion = self.text.used_tokens()
        reasoning = len(self.state.tokenizer.encode(self.text.reasoning, add_special_tokens=False)) \
            if self.text.reasoning else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.stats.get("cached_tokens", 0)},
                "completion_tokens_details": {"reasoning_tokens": min(reasoning, completion)}}

    def _log(self, outcome: str):
        s = self.stats
        elapsed = time.perf_counter() - self.started
        first = f" first_text={self.first_text - self.started:.2f}s" if self.first_text else ""
        log.info("%s #%d prompt=%d (cached %d) completion=%d canvases=%d steps=%d visits=%d queue=%.2fs "
                 "prefill=%.2fs%s total=%.2fs -> %s", self.route, self.handle.id, len(self.request.prompt_ids),
                 s.get("cached_tokens", 0), len(self.text.tokens), s.get("canvases", 0), s.get("steps", 0),
                 s.get("visits", 0), s.get("queue_seconds", 0.0), s.get("prefill_seconds", 0.0), first, elapsed,
                 outcome)
