"""Streaming detokenization: text handed out as tokens arrive, equal to decoding them all at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer", "as_id_list"]


def as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # mx.array / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]



class StreamingDetokenizer:
    """Incremental decoding, one token (or a few) at a time; mlx-lm's StreamingDetokenizer shape.

    `text` is everything decoded so far, `last_segment` the part of it not read yet. A tail that does not decode to
    complete characters yet (e.g. the first bytes of a character spelled with byte-fallback tokens) is held back until
    the tokens that complete it arrive, or until `finalize()`. After `finalize()`, `text == decode(tokens)`.

    Each new piece is decoded together with the previous piece as context, so decoders that treat the start of a
    sequence specially (a stripped leading space, say) still give the same text as decoding everything at once.
    One difference remains, for invalid byte-fallback runs only: `decode` turns a whole run of byte tokens into
    U+FFFD when any part of it is not UTF-8, while characters this has already handed out stay as they were.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self):
        self.tokens: list[int] = []
        self.offset = 0  # how much of `text` has been handed out by `last_segment`
        self._text = ""
        self._context_start = 0  # tokens[_context_start:_pending_start] were the last piece emitted
        self._pending_start = 0  # tokens[_pending_start:] are not in `text` yet
        self._context_text = ""  # decode(tokens[_context_start:_pending_start])

    def _decode(self, ids):
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool):
        if self._pending_start == len(self.tokens):
            return
        full = self._decode(self.tokens[self._context_start:])
        if not force and (full.endswith("\ufffd") or not full.startswith(self._context_text)):
            return  # an incomplete character at the end (or an unstable decode): wait for more tokens
        if full.startswith(self._context_text):
            new = full[len(self._context_text):]
        else:  # forced, and the context decodes differently in this company: fall back to the piece alone
            new = self._decode(self.tokens[self._pending_start:])
        self._text += new
        self._context_start = self._pending_start
        self._pending_start = len(self.tokens)
        self._context_text = self._decode(self.tokens[self._context_start:self._pending_start])

    def add_token(self, token: int):
        self.tokens.append(int(token))
        self._advance(force=False)

    def add_tokens(self, tokens: Iterable[int]):
        tokens = as_id_list(tokens)
        if tokens:
            self.tokens.extend(tokens)
            self._advance(force=False)

    def finalize(self):
        self._advance(force=True)

    @property
    def text(self) -> str:
        return self._text

    @property
    def last_segment(self) -> str:
        segment = self._text[self.offset:]
        self.offset = len(self._text)
        return segment


