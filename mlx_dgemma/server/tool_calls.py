"""Gemma 4 tool calls: reading `<|tool_call>call:NAME{...}<tool_call|>` out of model text (writing them back into a
prompt is the chat template's job: `chat_template.gemma4_value`).

The syntax: an object is `{key:value,...}` with bare keys (or `<|"|>`-quoted ones); strings are `<|"|>...<|"|>` and
may hold any character, `,` `{` `]` included; numbers, `true`, `false`, `null` are bare; arrays are `[...]`. The
model sometimes writes an unquoted string (`{city:Austin}`) or drops the `call:` prefix; both are read. Names may
hold letters, digits, `_ - . :` (namespaced tools such as `mcp.calendar:list_events`).
"""

from __future__ import annotations

import re

from ..chat_template import QUOTE

CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"

_NAME = re.compile(r"\s*(?:call:)?([\w.:-]+)\s*\{", re.DOTALL)
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


class ToolCallSyntaxError(ValueError):
    pass


def parse_call(text: str) -> tuple[str, dict]:
    """`(name, arguments)` from the text between the call markers, e.g. `call:get_weather{city:<|"|>Oslo<|"|>}`."""
    m = _NAME.match(text)
    if not m:
        raise ToolCallSyntaxError(f"not a tool call: {text[:80]!r}")
    reader = _Reader(text, m.end() - 1)
    arguments = reader.value()
    if reader.rest().strip():
        raise ToolCallSyntaxError(f"text after the arguments of {m.group(1)}: {reader.rest()[:40]!r}")
    return m.group(1), arguments


class _Reader:
    """A recursive-descent reader of Gemma 4 argument values."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def rest(self) -> str:
        return self.text[self.pos:]

    def _skip(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        self._skip()
        if self.pos >= len(self.text):
            raise ToolCallSyntaxError("the tool call ends inside its arguments")
        return self.text[self.pos]

    def value(self):
        c = self._peek()
        if self.text.startswith(QUOTE, self.pos):
            return self._string()
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        return self._bare()

    def _string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise ToolCallSyntaxError("an unterminated string")
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def _object(self) -> dict:
        self.pos += 1
        out = {}
        if self._peek() == "}":
            self.pos += 1
            return out
        while True:
            key = self._string() if self.text.startswith(QUOTE, self.pos) else self._key()
            if self._peek() != ":":
                raise ToolCallSyntaxError(f"expected ':' after key {key!r}")
            self.pos += 1
            out[key] = self.value()
            c = self._peek()
            self.pos += 1
            if c == "}":
                return out
            if c != ",":
                raise ToolCallSyntaxError(f"expected ',' or '}}' after the value of {key!r}")

    def _key(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ":{}[],":
            self.pos += 1
        key = self.text[start:self.pos].strip()
        if not key:
            raise ToolCallSyntaxError("an empty key")
        return key

    def _array(self) -> list:
        self.pos += 1
        out = []
        if self._peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            c = self._peek()
            self.pos += 1
            if c == "]":
                return out
            if c != ",":
                raise ToolCallSyntaxError("expected ',' or ']' in an array")

    def _bare(self):
        start, depth = self.pos, 0
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in ",}]" and depth == 0:
                break
            depth += c in "{["
            depth -= c in "}]"
            self.pos += 1
        word = self.text[start:self.pos].strip()
        if word in ("true", "false"):
            return word == "true"
        if word == "null":
            return None
        if _NUMBER.match(word):
            return float(word) if any(ch in word for ch in ".eE") else int(word)
        return word  # an unquoted string, as the model sometimes writes one
