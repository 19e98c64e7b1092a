"""The tokenizer of a DiffusionGemma folder: `tokenizer.json` through the `tokenizers` library (or a SentencePiece
`tokenizer.model` through `sentencepiece`, see `sp_tokenizer.py`), with the folder's special tokens and chat
templates; nothing here imports transformers.

    tok = load_tokenizer("path/to/model")          # None when the folder has no tokenizer.json / tokenizer.model
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    text = tok.decode(generated_ids)                # special tokens kept, so that...
    reasoning, answer = split_reasoning(text)       # ...the thought channel can be separated (reasoning.py)

Chat templates live in `chat_template.py`, streaming decoding in `detokenizer.py`, the thought channel in
`reasoning.py`; their names are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .chat_template import BUILTIN_CHAT_TEMPLATE, ChatTemplateError, compile_template
from .detokenizer import StreamingDetokenizer, as_id_list
from .reasoning import THOUGHT_CLOSE, THOUGHT_LABEL, THOUGHT_OPEN, split_reasoning

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "split_reasoning",
    "THOUGHT_OPEN",
    "THOUGHT_CLOSE",
    "THOUGHT_LABEL",
]


class TokenizerLoadError(ValueError):
    """A tokenizer file of the folder could not be read; the message names the file."""



# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(value) -> str | None:
    """A special-token entry of a config: a string, or a serialized AddedToken (`{"content": ...}`)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerLoadError(f"{path}: cannot read {what}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise TokenizerLoadError(f"{path}: malformed JSON in {what} ({where}): {e.msg}") from e


def _read_json_object(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: {what} must hold a JSON object, found {type(data).__name__}")
    return data


class Tokenizer:
    """A model folder's tokenizer: `tokenizer.json` plus `tokenizer_config.json`, `special_tokens_map.json`,
    `generation_config.json` (end-of-generation ids) and the chat template, all optional but the first.

    Construct with `load_tokenizer(folder)` or `Tokenizer.from_folder(folder)`.
    """

    def __init__(
        self,
        backend,
        config: dict | None = None,
        *,
        special_tokens_map: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | None = None,
        chat_template_origin: str | None = None,
        chat_templates: dict[str, str] | None = None,
        use_builtin_template: bool = True,
        name: str = "tokenizer",
    ):
        """`backend` is a `tokenizers.Tokenizer`. `chat_template` (the folder's) wins over the built-in Gemma 4
        template, which is used only if the vocabulary has the Gemma 4 turn tokens and `use_builtin_template`."""
        self._tok = backend
        self.name = name
        self.config = dict(config or {})
        special = dict(special_tokens_map or {})

        def vocab_has(token):
            return token is not None and backend.token_to_id(token) is not None

        def special_token(key, default):
            value = _token_content(self.config.get(key))
            if value is None:
                value = _token_content(special.get(key))
            if value is None and vocab_has(default):
                value = default
            return value

        self.bos_token = special_token("bos_token", "<bos>")
        self.eos_token = special_token("eos_token", "<eos>")
        self.pad_token = special_token("pad_token", "<pad>")
        self.unk_token = special_token("unk_token", "<unk>")
        self.mask_token = special_token("mask_token", "<mask>")
        self.bos_token_id = self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None
        self.pad_token_id = self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None
        if self.pad_token_id is None and generation_config and isinstance(generation_config.get("pad_token_id"), int):
            self.pad_token_id = generation_config["pad_token_id"]
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

        eos_ids = (generation_config or {}).get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        if isinstance(eos_ids, list) and eos_ids and all(isinstance(i, int) for i in eos_ids):
            self.eos_token_ids = list(eos_ids)
        else:
            self.eos_token_ids = [self.eos_token_id] if self.eos_token_id is not None else []

        # BOS / EOS when `add_special_tokens=True`: an explicit add_bos_token / add_eos_token in the config rules (as
        # in transformers, which rebuilds the post-processor from them); otherwise tokenizer.json's post-processor.
        explicit = "add_bos_token" in self.config or "add_eos_token" in self.config
        self._manual_special = explicit
        self.add_bos_token = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.add_eos_token = bool(self.config.get("add_eos_token", False)) and self.eos_token_id is not None
        if not explicit:
            probe = backend.encode("a", add_special_tokens=True).ids
            self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
            self.add_eos_token = self.eos_token_id is not None and len(probe) > 1 and probe[-1:] == [self.eos_token_id]

        self.chat_templates = dict(chat_templates or {})
        self.chat_template_origin = chat_template_origin
        if chat_template is None and use_builtin_template and all(
            vocab_has(t) for t in ("<|turn>", "<turn|>", THOUGHT_OPEN, THOUGHT_CLOSE)
        ):
            chat_template, self.chat_template_origin = BUILTIN_CHAT_TEMPLATE, "built-in Gemma 4 template"
        self.chat_template = chat_template
        self._compiled_template = (
            compile_template(chat_template, self.chat_template_origin or name) if chat_template is not None else None
        )

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """`tokenizer.json` through `tokenizers`; without one, a SentencePiece `tokenizer.model`."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file():
            from .sp_tokenizer import SentencePieceBackend, SentencePieceLoadError

            try:
                backend = SentencePieceBackend.from_file(folder / "tokenizer.model")
            except SentencePieceLoadError as e:
                raise TokenizerLoadError(str(e)) from e
        else:
            backend = _tokenizers_backend(folder / "tokenizer.json")

        config_path = folder / "tokenizer_config.json"
        config = _read_json_object(config_path, "tokenizer_config.json") or {}
        special = _read_json_object(folder / "special_tokens_map.json", "special_tokens_map.json")
        generation = _read_json_object(folder / "generation_config.json", "generation_config.json")

        template, origin, templates = None, None, {}
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                template, origin = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerLoadError(f"{jinja_path}: cannot read the chat template: {e}") from e
        entry = config.get("chat_template")
        if entry is not None:
            if isinstance(entry, str):
                templates = {"default": entry}
            elif isinstance(entry, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in entry
            ):
                templates = {t["name"]: t["template"] for t in entry}
            else:
                raise TokenizerLoadError(
                    f"{config_path}: \"chat_template\" must be a string or a list of {{\"name\", \"template\"}} objects"
                )
            if template is None and "default" in templates:
                template, origin = templates["default"], f"{config_path} (chat_template)"
        if template is None and templates:
            raise TokenizerLoadError(
                f"{config_path}: \"chat_template\" lists templates {sorted(templates)} but none is named \"default\""
            )
        # A folder's named templates (tool_use, ...) compile lazily, when asked for.
        return cls(
            backend,
            config,
            special_tokens_map=special,
            generation_config=generation,
            chat_template=template,
            chat_template_origin=origin,
            chat_templates=templates,
            name=str(folder),
        )

    # -- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """Id of one token string (None if unknown), or a list of ids for a list of strings."""
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in as_id_list(ids)]

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    # -- encode / decode ---------------------------------------------------------------------------------------------

    def _finish(self, text: str, ids: list[int], add_special_tokens: bool) -> list[int]:
        if not add_special_tokens:
            return ids
        if self._manual_special:
            if self.add_bos_token and not (ids[:1] == [self.bos_token_id] and text.startswith(self.bos_token)):
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
            return ids
        # post-processor path: never two BOS when the text already begins with the BOS string
        bos = self.bos_token_id
        if self.add_bos_token and self.bos_token and text.startswith(self.bos_token) and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}")
        use_post = add_special_tokens and not self._manual_special
        ids = self._tok.encode(text, add_special_tokens=use_post).ids
        return self._finish(text, ids, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        use_post = add_special_tokens and not self._manual_special
        encs = self._tok.encode_batch(list(texts), add_special_tokens=use_post)
        return [self._finish(t, e.ids, add_special_tokens) for t, e in zip(texts, encs)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _template_for(self, chat_template: str | None):
        if chat_template is None:
            if self._compiled_template is None:
                raise ChatTemplateError(
                    f"{self.name}: no chat template: the folder ships none (chat_template.jinja or"
                    " tokenizer_config.json) and the vocabulary has no Gemma 4 turn tokens for the built-in one"
                )
            return self._compiled_template
        if chat_template in self.chat_templates:
            origin = f"{self.name} (chat template {chat_template!r})"
            return compile_template(self.chat_templates[chat_template], origin)
        return compile_template(chat_template, "chat_template argument")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        enable_thinking: bool = False,
        *,
        chat_template: str | None = None,
        **template_kwargs,
    ):
        """Render `messages` with the chat template; token ids when `tokenize` (no extra BOS: the template writes
        it), else the string. `chat_template` picks a named template of the folder or is a template source itself.
        Extra keyword arguments (tools, documents, ...) reach the template as variables."""
        import jinja2

        template = self._template_for(chat_template)
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }
        variables.update(template_kwargs)
        variables.update(
            messages=list(messages), add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        try:
            text = template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.chat_template_origin or self.name}: chat template failed: {e}") from e
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, template={self.chat_template_origin!r})"


def _tokenizers_backend(tok_path: Path):
    from tokenizers import Tokenizer as _Backend

    try:
        return _Backend.from_file(str(tok_path))
    except Exception as e:  # the tokenizers library raises plain Exception; say what is wrong with the file
        raw = _read_json(tok_path, "tokenizer.json")  # raises the JSON error (line, column) if that is it
        if not isinstance(raw, dict) or "model" not in raw:
            raise TokenizerLoadError(f"{tok_path}: not a `tokenizers` tokenizer.json (no \"model\" entry)") from e
        raise TokenizerLoadError(f"{tok_path}: the tokenizers library cannot load it: {e}") from e


def load_tokenizer(folder) -> Tokenizer | None:
    """The folder's tokenizer (`tokenizer.json`, else a SentencePiece `tokenizer.model`), or None when it has
    neither. Malformed files raise `TokenizerLoadError` (a ValueError naming the file); a chat template that does
    not compile raises `ChatTemplateError`."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    return Tokenizer.from_folder(folder)
