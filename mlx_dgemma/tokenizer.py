"""Tokenizer, chat templates and streaming detokenization for DiffusionGemma folders.

Built on the `tokenizers` library (it reads the folder's `tokenizer.json`) and `jinja2` (chat templates); nothing
here imports transformers.

    tok = load_tokenizer("path/to/model")          # None when the folder has no tokenizer.json
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    text = tok.decode(generated_ids)                # special tokens kept, so that...
    reasoning, answer = split_reasoning(text)       # ...the thought channel can be separated

Gemma 4 chat format (what the built-in template writes when a folder ships none):

    <bos><|turn>system\\n[<|think|>\\n]{system}<turn|>\\n<|turn>user\\n{msg}<turn|>\\n<|turn>model\\n

The system turn is written when there is a system message or thinking is on. Previous model turns are re-rendered
with their reasoning (`<|channel>thought\\n ... <channel|>`) removed. With thinking off the generation prompt ends
with the empty thought channel `<|channel>thought\\n<channel|>`; with thinking on it ends at `<|turn>model\\n`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "split_reasoning",
]

THOUGHT_OPEN = "<|channel>"
THOUGHT_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought"

# Our own Gemma 4 text chat template (used only when the folder ships no template). Plain jinja, so it can also be
# written out as a `chat_template.jinja`.
BUILTIN_CHAT_TEMPLATE = r"""{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- macro render_content(content, strip_thinking) -%}
{%- if content is string -%}
{%- set text = content -%}
{%- elif content is none -%}
{%- set text = '' -%}
{%- else -%}
{%- set ns = namespace(text='') -%}
{%- for part in content -%}
{%- if part is string -%}
{%- set ns.text = ns.text + part -%}
{%- elif part['type'] == 'text' -%}
{%- set ns.text = ns.text + part['text'] -%}
{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}
{%- set ns.text = ns.text + '<|image|>' -%}
{%- elif part['type'] == 'audio' -%}
{%- set ns.text = ns.text + '<|audio|>' -%}
{%- elif part['type'] == 'video' -%}
{%- set ns.text = ns.text + '<|video|>' -%}
{%- else -%}
{{- raise_exception('Unsupported content part type: ' ~ part['type']) -}}
{%- endif -%}
{%- endfor -%}
{%- set text = ns.text -%}
{%- endif -%}
{%- if strip_thinking -%}
{%- set ns2 = namespace(out='', rest=text) -%}
{%- for _ in range(text.count('<|channel>')) -%}
{%- set head = ns2.rest.split('<|channel>', 1) -%}
{%- set ns2.out = ns2.out + head[0] -%}
{%- if '<channel|>' in head[1] -%}
{%- set ns2.rest = head[1].split('<channel|>', 1)[1] -%}
{%- else -%}
{%- set ns2.rest = '' -%}
{%- endif -%}
{%- endfor -%}
{%- set text = ns2.out + ns2.rest -%}
{%- endif -%}
{{- text | trim -}}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- set system_message = render_content(messages[0]['content'], false) -%}
{%- set rest = messages[1:] -%}
{%- set has_system = true -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set rest = messages -%}
{%- set has_system = false -%}
{%- endif -%}
{%- if has_system or thinking -%}
{{- '<|turn>system\n' -}}
{%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{{- system_message -}}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in rest -%}
{%- if message['role'] == 'user' -%}
{{- '<|turn>user\n' + render_content(message['content'], false) + '<turn|>\n' -}}
{%- elif message['role'] in ['assistant', 'model'] -%}
{{- '<|turn>model\n' + render_content(message['content'], true) + '<turn|>\n' -}}
{%- elif message['role'] in ['system', 'developer'] -%}
{{- raise_exception('A system message is only supported as the first message.') -}}
{%- else -%}
{{- raise_exception('Unsupported message role: ' ~ message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


class TokenizerLoadError(ValueError):
    """A tokenizer file of the folder could not be read; the message names the file."""


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render (including its own `raise_exception`)."""


# --------------------------------------------------------------------------------------------------------------------
# Chat template rendering (jinja2, sandboxed, HF-compatible environment)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like HF's: no ASCII escaping, and no HTML-safe escaping (unlike jinja2's built-in tojson).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _jinja_environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile_template(source: str, origin: str):
    import jinja2

    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template syntax error (template line {e.lineno}): {e.message}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{origin}: invalid chat template: {e}") from e


# --------------------------------------------------------------------------------------------------------------------
# Reasoning / answer split


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


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenizer


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
        tokens = _as_id_list(tokens)
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


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # mx.array / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


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
            _compile_template(chat_template, self.chat_template_origin or name) if chat_template is not None else None
        )

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        from tokenizers import Tokenizer as _Backend

        folder = Path(folder)
        tok_path = folder / "tokenizer.json"
        try:
            backend = _Backend.from_file(str(tok_path))
        except Exception as e:  # the tokenizers library raises plain Exception; say what is wrong with the file
            raw = _read_json(tok_path, "tokenizer.json")  # raises the JSON error (line, column) if that is it
            if not isinstance(raw, dict) or "model" not in raw:
                raise TokenizerLoadError(f"{tok_path}: not a `tokenizers` tokenizer.json (no \"model\" entry)") from e
            raise TokenizerLoadError(f"{tok_path}: the tokenizers library cannot load it: {e}") from e

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
        return [self._tok.id_to_token(i) for i in _as_id_list(ids)]

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
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

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
            return _compile_template(self.chat_templates[chat_template], origin)
        return _compile_template(chat_template, "chat_template argument")

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


def load_tokenizer(folder) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has no `tokenizer.json`. Malformed files raise `TokenizerLoadError`
    (a ValueError naming the file); a chat template that does not compile raises `ChatTemplateError`."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_folder(folder)
