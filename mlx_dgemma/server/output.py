"""From committed token ids to what a client sees: answer text, reasoning text and tool calls, as they stream.

One pipeline for streaming and non-streaming replies (so the two always agree): the ids are decoded with special
tokens kept (Gemma 4's channel and tool-call markers are special tokens), stop strings are looked for across canvas
boundaries, and the text is split on the markers. Anything that might be the start of a marker or of a stop string
is held back until the next canvas settles it, so no marker ever reaches `content`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..reasoning import THOUGHT_CLOSE, THOUGHT_LABEL, THOUGHT_OPEN
from .tool_calls import CALL_CLOSE, CALL_OPEN, ToolCallSyntaxError, parse_call

REASONING_OPEN = (THOUGHT_OPEN, "<think>")
REASONING_CLOSE = (THOUGHT_CLOSE, "</think>")
CHANNEL_LABELS = (THOUGHT_LABEL, "final")
# End-of-turn markers that may survive decoding: never shown.
DROPPED = ("<turn|>", "<eos>", "<|tool_response>", "<bos>", "<pad>")
_MARKERS = (*REASONING_OPEN, *REASONING_CLOSE, CALL_OPEN, CALL_CLOSE, *DROPPED)


def _held_suffix(text: str, words) -> int:
    """Length of the longest end of `text` that is the start of one of `words` (and so may become one)."""
    best = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces; the stop string itself is never returned."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def add(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            self.stopped, out, self.pending = True, self.pending[:cut], ""
            return out
        keep = 0 if final else _held_suffix(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_calls)


class ChannelParser:
    """Splits streamed model text into answer, reasoning and tool calls on Gemma 4's markers (and `<think>`)."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "content"
        self.pending = ""
        self.label_pending = in_reasoning
        self.started = {"content": False, "reasoning": False}
        self.tool_text = ""
        self.failed_calls: list[str] = []

    def _emit(self, delta: Delta, text: str):
        if not text:
            return
        if self.state == "tool":
            self.tool_text += text
            return
        if not self.started[self.state]:
            text = text.lstrip()
            if not text:
                return
            self.started[self.state] = True
        setattr(delta, self.state, getattr(delta, self.state) + text)

    def _strip_label(self, final: bool) -> bool:
        """After a channel opens: drop its name (`thought`), once it can be told apart from ordinary text."""
        head = self.pending.lstrip()
        for label in CHANNEL_LABELS:
            if head.startswith(label) and (len(head) > len(label) or final):
                rest = head[len(label):]
                if not rest or rest[0].isspace() or rest.startswith("<"):
                    self.pending = rest
                self.label_pending = False
                return True
            if label.startswith(head) and not final:
                return False  # "thou": could still be the label or "thousand"
        self.label_pending = False
        return True

    def add(self, text: str, final: bool = False) -> Delta:
        self.pending += text
        delta = Delta()
        while True:
            if self.label_pending and not self._strip_label(final):
                break
            if self.state == "tool":
                markers = (CALL_CLOSE,)
            elif self.state == "reasoning":
                markers = (*REASONING_CLOSE, CALL_OPEN, *DROPPED)
            else:
                markers = (*REASONING_OPEN, CALL_OPEN, *DROPPED, *REASONING_CLOSE)
            found = [(i, m) for m in markers if (i := self.pending.find(m)) >= 0]
            if not found:
                keep = 0 if final else _held_suffix(self.pending, _MARKERS)
                self._emit(delta, self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            i, marker = min(found)
            self._emit(delta, self.pending[:i])
            self.pending = self.pending[i + len(marker):]
            self._switch(marker, delta)
        if final and self.state == "tool" and self.tool_text:
            self.failed_calls.append(self.tool_text)  # an unfinished call is not a call
            self.tool_text = ""
        return delta

    def _switch(self, marker: str, delta: Delta):
        if marker in REASONING_OPEN:
            self.state, self.label_pending = "reasoning", True
        elif marker in REASONING_CLOSE:
            self.state = "content"  # a close with no open: the prompt opened the channel
        elif marker == CALL_OPEN:
            self.state, self.tool_text = "tool", ""
        elif marker == CALL_CLOSE:
            try:
                delta.tool_calls.append(parse_call(self.tool_text))
            except ToolCallSyntaxError:
                self.failed_calls.append(self.tool_text)
            self.state, self.tool_text = "content", ""


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether the prompt ends inside an open thought channel (the model's first words are then reasoning)."""
    opened = max(prompt_text.rfind(m) for m in REASONING_OPEN)
    closed = max(prompt_text.rfind(m) for m in REASONING_CLOSE)
    return opened > closed


class TextStream:
    """Committed ids in, `Delta`s out; `stopped` once a stop string was found (the caller ends the request)."""

    def __init__(self, tokenizer, eos_ids, stops: list[str], in_reasoning: bool = False, raw: bool = False):
        """`raw`: the text as it is, markers and all (a plain completion), not split."""
        self.tokenizer = tokenizer
        self.raw = raw
        self.eos = set(eos_ids)
        self.detok = tokenizer.detokenizer()
        self.stop = StopMatcher(stops)
        self.parser = ChannelParser(in_reasoning)
        self.tokens: list[int] = []
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[tuple[str, dict]] = []

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def add(self, tokens: list[int], final: bool = False) -> Delta:
        if self.stop.stopped:
            return Delta()
        self.tokens.extend(tokens)
        self.detok.add_tokens([t for t in tokens if t not in self.eos])
        if final:
            self.detok.finalize()
        text = self.stop.add(self.detok.last_segment, final=final)
        delta = Delta(content=text) if self.raw else self.parser.add(text, final=final or self.stop.stopped)
        self.content += delta.content
        self.reasoning += delta.reasoning
        self.tool_calls += delta.tool_calls
        return delta

    def used_tokens(self) -> int:
        """Tokens the reply used: with a stop string, those up to the one that completed it."""
        if not self.stop.stopped:
            return len(self.tokens)
        lo, hi = 1, len(self.tokens)
        while lo < hi:  # the shortest prefix whose text holds a stop string
            mid = (lo + hi) // 2
            text = self.tokenizer.decode([t for t in self.tokens[:mid] if t not in self.eos])
            lo, hi = (lo, mid) if any(s in text for s in self.stop.stops) else (mid + 1, hi)
        return lo
