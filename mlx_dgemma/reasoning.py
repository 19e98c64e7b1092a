"""Gemma 4's thought channel: splitting reasoning from the answer, whole or as committed text streams in.

Reasoning is what the model writes inside `<|channel>thought\\n ... <channel|>`; decode with special tokens kept.
"""

from __future__ import annotations

__all__ = ["THOUGHT_OPEN", "THOUGHT_CLOSE", "THOUGHT_LABEL", "ChannelSplitter", "display_draft", "split_reasoning"]

THOUGHT_OPEN = "<|channel>"
THOUGHT_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought"


def split_reasoning(text: str) -> tuple[str, str]:
    """`(reasoning, answer)` from decoded model output (decoded with special tokens kept).

    Reasoning is what the model writes inside `<|channel>thought\\n ... <channel|>`; an unterminated channel (the
    generation ran out while thinking) counts as reasoning to the end of the text. Several channels are joined with
    a blank line. The answer is everything outside the channels. Both are stripped of surrounding whitespace; other
    special tokens (e.g. a trailing `<turn|>`) are left in place.
    """
    reasoning: list[str] = []
    answer: list[str] = []
    rest = text
    while True:
        start = rest.find(THOUGHT_OPEN)
        if start < 0:
            answer.append(rest)
            break
        answer.append(rest[:start])
        rest = rest[start + len(THOUGHT_OPEN):]
        end = rest.find(THOUGHT_CLOSE)
        body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(THOUGHT_CLOSE):])
        if body.startswith(THOUGHT_LABEL):
            body = body[len(THOUGHT_LABEL):]
        body = body.strip()
        if body:
            reasoning.append(body)
        if end < 0:
            break
    return "\n\n".join(reasoning), "".join(answer).strip()


_CONTROL_STRINGS = (THOUGHT_OPEN + THOUGHT_LABEL, THOUGHT_OPEN, THOUGHT_CLOSE, "<|turn>", "<turn|>")


def display_draft(text: str) -> str:
    """A draft for display: the chat's control tokens removed."""
    for s in _CONTROL_STRINGS:
        text = text.replace(s, "")
    return text


class ChannelSplitter:
    """Feeds committed text in, gives back what is new in the reasoning and in the answer."""

    def __init__(self):
        self.raw = ""
        self.reasoning = ""
        self.answer = ""

    def add(self, text: str) -> tuple[str, str]:
        self.raw += text
        reasoning, answer = split_reasoning(self.raw)
        new = []
        for old, now, name in ((self.reasoning, reasoning, "reasoning"), (self.answer, answer, "answer")):
            if now.startswith(old):  # (a channel's text only grows; if it ever does not, show nothing new)
                new.append(now[len(old):])
                setattr(self, name, now)
            else:
                new.append("")
        return new[0], new[1]
