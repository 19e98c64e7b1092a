"""A SentencePiece `tokenizer.model` behind the interface `Tokenizer` expects of a `tokenizers` backend.

Some folders ship only the SentencePiece model (no `tokenizer.json`). `SentencePieceBackend` wraps
`sentencepiece` so that `Tokenizer` (special tokens, chat template, streaming) works on it unchanged:

- Plain text encodes and decodes exactly as `sentencepiece` itself does (one `encode` / `decode` call).
- Special tokens are the control and unknown pieces (which SentencePiece never produces from text: `<bos>` in a
  string would otherwise be spelled `<`, `bos`, `>`) and the user-defined pieces spelled `<...>` (the Gemma turn
  and channel markers, which SentencePiece already matches whole). As Hugging Face tokenizers do, the control
  pieces' strings are split out of the text before encoding, and decoding writes special pieces as their strings
  (SentencePiece writes control pieces as nothing) unless `skip_special_tokens`.
- `add_special_tokens=True` prepends the BOS piece (Gemma's convention); a `tokenizer_config.json` with
  `add_bos_token`/`add_eos_token` overrides that in `Tokenizer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# sentencepiece_model.proto's piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceLoadError(ValueError):
    """`tokenizer.model` could not be read; the message names the file."""


@dataclass(frozen=True)
class AddedToken:
    """What `get_added_tokens_decoder` maps an id to (the fields `Tokenizer` reads)."""

    content: str
    special: bool


@dataclass(frozen=True)
class Encoding:
    ids: list[int]


class SentencePieceBackend:
    def __init__(self, processor, piece_types: list[int]):
        self._sp = processor
        self._types = piece_types
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        self._vocab = {p: i for i, p in enumerate(pieces)}
        self._special = {
            i for i, (p, t) in enumerate(zip(pieces, piece_types))
            if t in (_CONTROL, _UNKNOWN) or (t == _USER_DEFINED and p.startswith("<") and p.endswith(">"))
        }
        self._added = {i: AddedToken(pieces[i], True) for i in sorted(self._special)}
        # Longest first, so that a control piece containing another is matched whole.
        split_out = sorted((pieces[i] for i in self._special if piece_types[i] != _USER_DEFINED), key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, split_out)) + ")") if split_out else None
        bos = self._vocab.get("<bos>", processor.bos_id())
        self._bos = bos if bos is not None and bos >= 0 else None

    @classmethod
    def from_file(cls, path) -> "SentencePieceBackend":
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SentencePieceLoadError(f"{path}: cannot read the SentencePiece model: {e}") from e
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(data)
            processor = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # protobuf's DecodeError, sentencepiece's RuntimeError: say which file
            raise SentencePieceLoadError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from e
        if not proto.pieces:
            raise SentencePieceLoadError(f"{path}: the SentencePiece model has no pieces")
        return cls(processor, [p.type for p in proto.pieces])

    @property
    def processor(self):
        """The `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    # -- vocabulary -----------------------------------------------------------------------------------------------

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._types)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(i) if 0 <= i < len(self._types) else None

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)

    # -- encode / decode ------------------------------------------------------------------------------------------

    def _encode_ids(self, text: str) -> list[int]:
        if self._splitter is None:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(self._splitter.split(text)):
            if i % 2:
                ids.append(self._vocab[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids = self._encode_ids(text)
        if add_special_tokens and self._bos is not None:
            ids = [self._bos] + ids
        return Encoding(ids)

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = len(self._types)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the SentencePiece vocabulary [0, {n})")
        out, run = [], []
        for i in ids:
            if i in self._special:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)
