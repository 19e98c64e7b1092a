"""The files users bring: a reference-saved folder whose generation_config.json names no EOS, and a folder whose
tokenizer is only a SentencePiece `tokenizer.model` (trained here with `sentencepiece`)."""

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_dgemma
from mlx_dgemma.generate import generate_tokens, stream_generate

ROOT = Path(__file__).resolve().parents[1]
CONFIG_EOS = list(range(1, 300))  # config.json's EOS ids: most of the vocabulary, so a generation meets one soon


@pytest.fixture(scope="module")
def null_eos_folder(reference_factory, tmp_path_factory):
    """Saved by the reference with eos/pad left null in generation_config.json (so the keys are absent); config.json
    names the EOS ids."""
    source, _ = reference_factory("null-eos", generation={"eos_token_id": None, "pad_token_id": None})
    folder = tmp_path_factory.mktemp("null-eos")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert "eos_token_id" not in generation and "pad_token_id" not in generation
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = CONFIG_EOS
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_null_generation_eos_falls_back_to_config(null_eos_folder):
    model, _ = mlx_dgemma.load(null_eos_folder)
    assert model.sampler_defaults.eos_token_ids == CONFIG_EOS
    assert model.sampler_defaults.pad_token_id == 0
    (row,) = generate_tokens(model, [[2, 10, 11, 12]], max_tokens=64, seed=0)
    assert len(row) < 64 and row[-1] in CONFIG_EOS and not set(row[:-1]) & set(CONFIG_EOS)
    last = list(stream_generate(model, None, [2, 10, 11, 12], max_tokens=64, seed=0))[-1]
    assert last.finish_reason == "stop" and last.tokens[-1] in CONFIG_EOS


def test_per_call_eos_wins_over_both(null_eos_folder):
    model, _ = mlx_dgemma.load(null_eos_folder)
    (none,) = generate_tokens(model, [[2, 10, 11, 12]], max_tokens=40, seed=0, eos_token_ids=[])
    assert len(none) == 40  # no end-of-generation id at all: the budget ends it
    (free,) = generate_tokens(model, [[2, 10, 11, 12]], max_tokens=40, seed=0)
    assert free[-1] in CONFIG_EOS and 511 not in free
    (row,) = generate_tokens(model, [[2, 10, 11, 12]], max_tokens=40, seed=0, eos_token_ids=[511])
    assert row[: len(free)] == free and len(row) > len(free)  # the config's EOS no longer ends it
    assert len(row) == 40 or row[-1] == 511
    last = list(stream_generate(model, None, [2, 10, 11, 12], max_tokens=40, seed=0, eos_token_ids=[]))[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 40


# --- a SentencePiece tokenizer.model ----------------------------------------------------------------------------

SP_SPECIAL = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]
SP_TEXTS = ["hello world", "why is the sky blue?", "  two spaces, tabs\tand\nnew lines\n", "emoji 😀 ü é 42", ""]


def train_sentencepiece(vocab_size: int) -> bytes:
    """A BPE SentencePiece model the way Gemma's is set up: <pad> <eos> <bos> <unk> at 0-3, the turn and channel
    markers as user-defined pieces, byte fallback, no dummy prefix, text kept as it is (identity normalisation)."""
    import sentencepiece as spm

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "bla", "dro", "fen", "gri", "the", "sky",
                 "is", "blue", "why", "hello", "world"]
    lines = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(12))
             + rng.choice([".", "?", "!", ", 42", " é ü"]) for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"], user_defined_symbols=SP_SPECIAL, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2, num_threads=1,
    )
    return out.getvalue()


@pytest.fixture(scope="module")
def sp_folder(tiny, tmp_path_factory):
    """The tiny reference checkpoint with only a SentencePiece tokenizer.model (vocabulary = the model's)."""
    folder = tmp_path_factory.mktemp("tiny-sp")
    shutil.copytree(tiny[0], folder, dirs_exist_ok=True)
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    (folder / "tokenizer.model").write_bytes(train_sentencepiece(vocab))
    assert not (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(scope="module")
def sp_pair(sp_folder):
    import sentencepiece as spm

    from mlx_dgemma.tokenizer import load_tokenizer

    return load_tokenizer(sp_folder), spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


def test_sentencepiece_encodes_and_decodes_like_sentencepiece(sp_pair):
    tok, sp = sp_pair
    assert tok.vocab_size == sp.get_piece_size()
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.encode(text) == [2] + ids  # BOS, Gemma's convention
        assert tok.decode(ids) == sp.decode(ids) == text  # identity normalisation: text comes back as it was
    assert tok.encode_batch(SP_TEXTS[:2], add_special_tokens=False) == [sp.encode(t) for t in SP_TEXTS[:2]]
    assert tok.convert_ids_to_tokens(sp.encode("hello")) == sp.encode("hello", out_type=str)
    assert tok.convert_tokens_to_ids("not a piece") is None


def test_sentencepiece_special_tokens(sp_pair):
    tok, sp = sp_pair
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.eos_token_ids == [1]
    turn = sp.piece_to_id("<|turn>")
    assert set(tok.all_special_ids) >= {0, 1, 2, 3, sp.piece_to_id("<mask>"), turn}
    # control pieces in text are split out as their ids (SentencePiece alone would spell them out)...
    ids = tok.encode("<bos><|turn>user\nhi<turn|><eos>", add_special_tokens=False)
    assert ids[:2] == [2, turn] and ids[-1] == 1
    assert sp.encode("<bos>")[0] != 2
    # ...and decode back to their strings unless skipped; ordinary text between them decodes as SentencePiece does
    assert tok.decode(ids) == "<bos><|turn>user\nhi<turn|><eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    detok = tok.detokenizer()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == tok.decode(ids)


def test_sentencepiece_chat_template(sp_pair):
    tok, _ = sp_pair
    assert tok.chat_template_origin == "built-in Gemma 4 template"
    text = tok.apply_chat_template([{"role": "user", "content": "why is the sky blue"}], tokenize=False)
    assert text == "<bos><|turn>user\nwhy is the sky blue<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "why is the sky blue"}])
    assert ids[0] == 2 and ids.count(2) == 1 and tok.decode(ids) == text


def test_sentencepiece_folder_generates_from_the_command_line(sp_folder, sp_pair):
    tok, _ = sp_pair
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma.generate", "--model", str(sp_folder), "--prompt", "why is the sky blue",
         "--max-tokens", "8", "--seed", "0", "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    prompt_tokens = len(tok.apply_chat_template([{"role": "user", "content": "why is the sky blue"}]))
    assert f"Prompt: {prompt_tokens} tokens" in out.stdout


def test_broken_tokenizer_model_is_named(tmp_path):
    from mlx_dgemma.tokenizer import TokenizerLoadError, load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerLoadError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
