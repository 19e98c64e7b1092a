"""ChatSession and the chat REPL: cache reuse across turns, thinking, rendering with the real Gemma vocabulary,
cancellation from another thread, and the REPL driven in a real pseudo-terminal."""

import json
import os
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_dgemma
from mlx_dgemma.session import ChatSession, _common_prefix
from mlx_dgemma.config import SamplerConfig
from mlx_dgemma.diffusion import prefill

ROOT = Path(__file__).resolve().parents[1]
STATS = re.compile(r"\d+ tokens · [\d.]+ tok/s · prompt (?:[\d.]+ tok/s|cached) · peak [\d.]+ GB · [\d.]+ tokens/forward")

PORTUGAL = "Write a long essay about Portugal."
PORTUGAL_IDS = [2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107, 105, 4368, 107, 100, 45518,
                107, 101]


@pytest.fixture(scope="module")
def chat_folder(tiny_chat_folder):
    return tiny_chat_folder


@pytest.fixture(scope="module")
def endless_folder(chat_folder, tmp_path_factory):
    """The same model with no end-of-generation id: a reply runs until its token budget."""
    folder = tmp_path_factory.mktemp("tiny-chat-endless")
    for f in chat_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = []  # none at all (a missing or null entry falls back to config.json's EOS)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


@pytest.fixture(scope="module")
def loaded(chat_folder):
    return mlx_dgemma.load(chat_folder)


@pytest.fixture(autouse=True)
def fresh_defaults(loaded):
    model = loaded[0]
    saved = model.sampler_defaults
    yield
    model.sampler_defaults = saved


def tok_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def fresh_logits(model, ids, canvas):
    cache = model.make_cache()
    prefill(model, mx.array([ids]), cache)
    return model.denoise(canvas, cache)


def assert_cache_holds(session):
    """The session's cache holds exactly `cached_tokens`, at their positions, and they begin the conversation."""
    model = session.model
    ids = session.cached_tokens
    assert session.render(add_generation_prompt=False)[:len(ids)] == ids
    if not ids:
        return
    assert session.cache.offset == len(ids)
    canvas = mx.array(np.arange(model.args.canvas_length)[None] + 20)
    kept = model.denoise(canvas, session.cache)
    assert mx.abs(kept - fresh_logits(model, ids, canvas)).max().item() < 1e-4


# --- cache reuse -----------------------------------------------------------------------------------------------


def test_turn_two_encodes_only_new_tokens_and_matches_a_fresh_encode(loaded, monkeypatch):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, seed=0, max_denoising_steps=4)  # two canvases a reply
    real_encode = model.encode
    encoded, at_first_draft = [], []

    def counting_encode(ids, cache, attention_mask=None, **kwargs):
        if not at_first_draft:  # the prompt's tokens (canvases are encoded after the first draft)
            encoded.append(ids.shape[1])
        return real_encode(ids, cache, attention_mask=attention_mask, **kwargs)

    def on_draft(_):
        if not at_first_draft:  # the decoder's view of the cache as this turn's diffusion starts
            canvas = mx.array(np.arange(model.args.canvas_length)[None] + 30)
            at_first_draft.append((canvas, model.denoise(canvas, session.cache)))

    def send(text):
        encoded.clear(), at_first_draft.clear()
        return session.send(text, on_draft=on_draft)

    monkeypatch.setattr(model, "encode", counting_encode)

    prompt1 = session.render("hello world")
    reply1 = send("hello world")
    assert sum(encoded) == len(prompt1) == reply1.prompt_tokens and reply1.reused_tokens == 0
    assert reply1.canvases == 2
    # The cache keeps the conversation up to the model turn's header; the empty thought channel of the
    # generation prompt and the reply's canvases are dropped.
    header = tok_ids(tokenizer, "<|turn>model")
    assert session.cached_tokens == prompt1[:len(prompt1) - 3] and session.cached_tokens[-2:] == header
    assert_cache_holds(session)

    prompt2 = session.render("why is the sky blue")
    assert prompt2[:len(session.cached_tokens)] == session.cached_tokens
    reused = len(session.cached_tokens)
    assert reused == _common_prefix(prompt1, prompt2)
    reply2 = send("why is the sky blue")
    assert sum(encoded) == len(prompt2) - reused == reply2.prompt_tokens  # the reply as rendered + the new turn
    assert reply2.reused_tokens == reused
    canvas, logits = at_first_draft[0]
    assert mx.abs(logits - fresh_logits(model, prompt2, canvas)).max().item() < 1e-4
    assert_cache_holds(session)

    # Switching thinking changes the system turn: the conversation is encoded afresh, still exactly.
    session.think = True
    prompt3 = session.render("hi")
    reply3 = send("hi")
    assert reply3.reused_tokens == 0 and sum(encoded) == len(prompt3)
    canvas, logits = at_first_draft[0]
    assert mx.abs(logits - fresh_logits(model, prompt3, canvas)).max().item() < 1e-4
    assert_cache_holds(session)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 3

    session.reset()
    assert session.history == [] and session.cached_tokens == []
    assert session.send("hello").reused_tokens == 0


def test_seeded_conversations_repeat(loaded):
    model, tokenizer = loaded
    a, b = (ChatSession(model, tokenizer, seed=5, max_denoising_steps=4) for _ in range(2))
    assert [a.send(t).tokens for t in ("hello", "the sky")] == [b.send(t).tokens for t in ("hello", "the sky")]


# --- thinking --------------------------------------------------------------------------------------------------


def scripted(session, monkeypatch, script, filler):
    """Make the model write `script` (then `filler`) as the reply, with certainty, through the real loop: the
    decoder's output is replaced (under every name the loop may call it by)."""
    model = session.model
    C, V = model.args.canvas_length, model.args.vocab_size

    def decoder(canvas, cache, *args, **kwargs):
        start = cache.offset - len(session.cached_tokens)  # where this canvas sits in the reply
        ids = [script[i] if i < len(script) else filler for i in range(start, start + C)]
        logits = np.full((1, C, V), -20.0, dtype=np.float32)
        logits[0, np.arange(C), ids] = 20.0
        return mx.array(logits)

    for name in ("denoise", "denoise_raw"):
        if hasattr(model, name):
            monkeypatch.setattr(model, name, decoder)


def test_thinking_spans_canvases_and_is_kept_apart(loaded, monkeypatch):
    model, tokenizer = loaded
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[1, 6])  # <eos>, <turn|>
    session = ChatSession(model, tokenizer, think=True, seed=0)
    assert session.settings().max_new_tokens == 4 * 32  # room beyond the thought channel
    thoughts = [f"w{i}" for i in range(20)]
    script = tok_ids(tokenizer, "<|channel> thought " + " ".join(thoughts) + " <channel|> hello world <turn|>")
    scripted(session, monkeypatch, script, tok_ids(tokenizer, "w99")[0])
    chunks = list(session.stream("why is the sky blue"))
    reply = chunks[-1].reply
    assert reply.canvases == 2 and reply.finish_reason == "stop"  # the thoughts filled the first canvas
    assert reply.text == "hello world" and reply.note is None
    assert reply.reasoning.endswith(" ".join(thoughts))
    assert "".join(c.text for c in chunks) == "hello world"
    assert "".join(c.reasoning for c in chunks).endswith(" ".join(thoughts))
    assert session.history[-1] == {"role": "assistant", "content": "hello world", "reasoning": reply.reasoning}
    # The next prompt carries the answer but not the reasoning (the template strips it).
    rendered = session.render("the sky")
    tail = tok_ids(tokenizer, "<|turn> model hello world <turn|> <|turn> user the sky <turn|> <|turn> model")
    assert rendered[-len(tail):] == tail
    assert tok_ids(tokenizer, "w5")[0] not in rendered
    monkeypatch.undo()
    assert_cache_holds(session)


def test_empty_replies_say_why(loaded, monkeypatch):
    model, tokenizer = loaded
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[1, 6])
    thinking = ChatSession(model, tokenizer, think=True, max_tokens=16, seed=0)
    scripted(thinking, monkeypatch, tok_ids(tokenizer, "<|channel> thought"), tok_ids(tokenizer, "w7")[0])
    reply = thinking.send("hi")
    assert reply.text == "" and reply.finish_reason == "length"
    assert "budget (16 tokens)" in reply.note and "thinking" in reply.note and reply.reasoning

    silent = ChatSession(model, tokenizer, seed=0)
    scripted(silent, monkeypatch, tok_ids(tokenizer, "<turn|>"), 0)
    reply = silent.send("hi")
    assert reply.text == "" and reply.finish_reason == "stop" and "without writing anything" in reply.note


# --- rendering with the real Gemma vocabulary ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma():
    import gemma_vocab
    from mlx_dgemma.tokenizer import load_tokenizer

    try:
        return load_tokenizer(gemma_vocab.gemma4_tokenizer_dir())
    except gemma_vocab.VocabUnavailable as e:
        pytest.skip(f"real Gemma vocabulary unavailable: {e}")


def gemma_session(gemma, **kwargs):
    """A session whose rendering runs for real; the model is a stand-in (nothing is generated)."""
    stub = types.SimpleNamespace(sampler_defaults=SamplerConfig(eos_token_ids=[1, 106, 50], pad_token_id=0),
                                 make_cache=lambda: None)
    return ChatSession(stub, gemma, **kwargs)


def test_gemma_prompt_thinking_off_and_on(gemma):
    session = gemma_session(gemma)
    assert session.render(PORTUGAL) == PORTUGAL_IDS
    # Snapshots: after the user turn, and after "<|turn>model\n" (where the re-rendered reply will start).
    assert session._snapshot_points(session.messages(PORTUGAL), PORTUGAL_IDS) == [13, 16]
    session.think = True
    ids = session.render(PORTUGAL)
    assert ids == tok_ids(gemma, "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n" + PORTUGAL +
                          "<turn|>\n<|turn>model\n")
    assert ids[:7] == [2, 105, 9731, 107, 98, 107, 106] and ids[-3:] == [105, 4368, 107]
    assert session._snapshot_points(session.messages(PORTUGAL), ids) == [len(ids) - 3, len(ids)]


def test_gemma_multi_turn_history(gemma):
    history = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nTwo plus two is four.<channel|>It is 4."},
    ]
    session = gemma_session(gemma, system_prompt="You are terse.", history=history)
    assert session.history[1] == {"role": "assistant", "content": "It is 4.", "reasoning": "Two plus two is four."}
    expected = ("<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\nIt is 4."
                "<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert session.render("Thanks") == tok_ids(gemma, expected)
    session.think = True
    ids = session.render("Thanks")
    assert ids == tok_ids(gemma, expected.replace("system\n", "system\n<|think|>\n").removesuffix(
        "<|channel>thought\n<channel|>"))
    assert tok_ids(gemma, "Two plus two is four.")[1] not in ids


@pytest.mark.parametrize("answer", ["It is 4.", "\n\nHello there", " leading space", "Olá! 日本語 🦩", "<b>x</b>",
                                    "<|channel>thought\nunclosed"])
def test_gemma_rerendered_reply_extends_the_kept_prefix(gemma, answer):
    """The prefix a turn keeps (through "<|turn>model\\n") is a prefix of the next turn's prompt, whatever the
    reply, with thinking on or off."""
    for think in (False, True):
        session = gemma_session(gemma, think=think)
        prompt1 = session.render(PORTUGAL)
        kept = session._snapshot_points(session.messages(PORTUGAL), prompt1)[-1]
        reply = ("<|channel>thought\nhmm<channel|>" if think else "") + answer
        session = gemma_session(gemma, think=think, history=[{"role": "user", "content": PORTUGAL},
                                                             {"role": "assistant", "content": reply}])
        assert session.render("More.")[:kept] == prompt1[:kept]


# --- cancellation ----------------------------------------------------------------------------------------------


def test_cancel_from_another_thread_stops_within_one_step(loaded):
    model, tokenizer = loaded
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[], confidence_threshold=1e-9)
    session = ChatSession(model, tokenizer, seed=0, max_tokens=16 * 500)
    drafts, started, result = [], threading.Event(), {}

    def on_draft(text):
        drafts.append(text)
        if len(drafts) >= 12:
            started.set()

    def work():
        try:
            result["reply"] = session.send("hello", on_draft=on_draft)
        finally:
            mx.clear_streams()  # the thread's own MLX streams (else the process may abort at exit)

    worker = threading.Thread(target=work)
    worker.start()
    assert started.wait(60)
    session.cancel()
    seen = len(drafts)
    worker.join(30)
    assert not worker.is_alive()
    assert len(drafts) - seen <= 1  # at most the step that was running
    reply = result["reply"]
    assert reply.finish_reason == "cancelled" and not session.running
    C = model.args.canvas_length
    if reply.tokens:  # whole canvases committed before the interrupted one are kept
        assert len(reply.tokens) % C == 0 and session.history[-1]["role"] == "assistant"
    else:
        assert session.history == [] and reply.note
    assert_cache_holds(session)
    session.max_tokens = 16
    again = session.send("the sky")  # still usable
    assert again.finish_reason == "length" and len(again.tokens) == 16
    assert_cache_holds(session)
    session.cancel()  # idle: nothing happens


def test_cancel_between_canvases_is_a_cancelled_turn(loaded):
    """A cancel that lands right after a canvas was committed (the REPL's Ctrl-C while it prints) ends the turn as
    cancelled with that canvas kept, never as a finished reply of "length"."""
    model, tokenizer = loaded
    model.sampler_defaults = model.sampler_defaults.updated(eos_token_ids=[], confidence_threshold=1e-9)
    session = ChatSession(model, tokenizer, seed=0, max_tokens=16 * 500)
    reply = None
    for chunk in session.stream("hello"):
        if chunk.text or chunk.reasoning:
            session.cancel()  # the stream is paused at the committed canvas's chunk
        if chunk.reply is not None:
            reply = chunk.reply
    C = model.args.canvas_length
    assert reply.finish_reason == "cancelled" and len(reply.tokens) == C
    assert session.history[-1]["role"] == "assistant" and not session.running
    assert_cache_holds(session)


def test_abandoned_stream_and_concurrent_turns(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, seed=0, max_tokens=32)
    session.send("hello")
    history, cached = session.history, session.cached_tokens
    stream = session.stream("the sky", drafts=True)
    next(stream)  # a draft: the turn is running
    assert session.running
    with pytest.raises(RuntimeError, match="already"):
        session.send("blue")
    with pytest.raises(RuntimeError, match="cancel"):
        session.reset()
    stream.close()  # abandoned: left out of the history, cache as before
    assert not session.running and session.history == history and session.cached_tokens == cached
    assert_cache_holds(session)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        ChatSession(model, tokenizer, max_denoising_steps=0)
    with pytest.raises(TypeError, match="unknown sampler"):
        ChatSession(model, tokenizer, temperature=0.5)


# --- the REPL --------------------------------------------------------------------------------------------------


def spawn_chat(folder, *args):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "mlx_dgemma.chat", "--model", str(folder), *map(str, args)],
                          env=env, encoding="utf-8", timeout=60, dimensions=(24, 100))
    child.expect_exact(">> ")
    return child


def say(child, line):
    child.sendline(line)
    child.expect(STATS)
    out = child.before
    child.expect_exact(">> ")
    return out


def test_repl_in_a_terminal(chat_folder):
    pexpect = pytest.importorskip("pexpect")

    child = spawn_chat(chat_folder, "--seed", "0", "-m", "16")
    say(child, "hello world")
    out = say(child, "why is the sky blue")
    assert "\x1b[2m" in out  # drafts drawn dimmed, then replaced
    child.sendline("/think on")
    child.expect_exact("[thinking on]")
    child.expect_exact(">> ")
    say(child, "hi")
    child.sendline("h")
    child.expect_exact("/canvas on|off")
    child.expect_exact(">> ")
    for command, answer in (("/steps 4", "[4 denoising steps per canvas]"), ("/seed 3", "[seed 3]"),
                            ("/canvas off", "[canvas off]"), ("/steps 0", "must be a positive integer"),
                            ("/bogus", "unknown command /bogus")):
        child.sendline(command)
        child.expect_exact(answer)
        child.expect_exact(">> ")
    say(child, "the sky")
    child.sendline("r")
    child.expect_exact("[chat reset]")
    child.expect_exact(">> ")
    child.sendline("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_ctrl_c_stops_the_generation(endless_folder):
    pexpect = pytest.importorskip("pexpect")

    child = spawn_chat(endless_folder, "--seed", "0", "-m", "1000000", "--confidence-threshold", "1e-9")
    child.sendline("hello world")
    child.expect_exact("\x1b[2m")  # the live canvas is being drawn
    child.expect_exact("\x1b[2m")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(STATS)
    child.expect_exact(">> ")
    child.sendline("/canvas off")
    child.expect_exact(">> ")
    child.sendline("the sky")  # the chat goes on; stop this one too
    child.expect(r"w\d+")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">> ")
    child.sendeof()  # Ctrl-D quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_output_is_plain_text(chat_folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mlx_dgemma.chat", "--model", str(chat_folder), "--seed", "0", "-m", "16"]
    r = subprocess.run(command, input="hello\n/think on\nhi\n", capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    assert len(STATS.findall(r.stdout)) == 2 and "[thinking on]" in r.stdout


def test_cli_errors_get_one_line(chat_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mlx_dgemma.chat", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120, input="")

    for args, message in ((["--model", chat_folder, "--steps", "0"], "--steps"),
                          (["--model", chat_folder, "-m", "0"], "--max-tokens"),
                          (["--model", tmp_path / "nope"], str(tmp_path / "nope"))):
        r = run(*args)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_stats_line_of_a_turn_with_nothing_new_to_encode():
    from mlx_dgemma.session import Reply

    fresh = Reply(text="x", prompt_tokens=12, prompt_tps=300.0, generation_tokens=4, generation_tps=20.0)
    cached = Reply(text="x", prompt_tokens=0, generation_tokens=4, generation_tps=20.0)
    assert "prompt 300.0 tok/s" in fresh.stats_line() and STATS.fullmatch(fresh.stats_line())
    assert "prompt cached" in cached.stats_line() and STATS.fullmatch(cached.stats_line())
