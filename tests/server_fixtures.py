"""A model folder and in-process servers for the server tests.

The tiny reference checkpoint gets a character-level tokenizer with the Gemma 4 control tokens (so the built-in
Gemma 4 template applies and tool-call text can be spelled), and the end-of-turn ids the released model has.
`scripted(...)` replaces the loop with one that commits given text, for what a random model cannot be made to say.
"""

from __future__ import annotations

import contextlib
import json
import string
import threading
import time
from pathlib import Path

import mlx.core as mx
from reference import IMAGE_TOKENS

from mlx_dgemma.distributed import free_starting_port

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
            "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def add_char_tokenizer(folder, vocab_size: int = 512):
    """One token per character (so a text's length counts its tokens), the Gemma 4 specials (and the image markers)
    as single tokens; the rest of the vocabulary is more single characters (from U+0100 on, surrogates skipped)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    n = vocab_size - len(SPECIALS) - len(CHARS)
    fill = [chr(c) for c in range(0x100, 0x100 + n + 0x800) if not 0xD800 <= c < 0xE000][:n]
    tokens = SPECIALS + CHARS + fill
    for offset, token in IMAGE_TOKENS.items():  # where build_reference puts the image markers
        tokens[vocab_size + offset] = token
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIALS + list(IMAGE_TOKENS.values())])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}
    ))
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [vocab["<eos>"], vocab["<turn|>"], vocab["<|tool_response>"]]
    config_path.write_text(json.dumps(config, indent=2))
    return vocab


def free_port() -> int:
    return free_starting_port(1)


@contextlib.contextmanager
def running_server(model, tokenizer, folder, *, api_key=None, allowed_origins="*", max_concurrency=8,
                   max_queue=32, context_length=None, prompt_cache_size=16, think=False):
    """A server on a free port in this process (its scheduler thread and a uvicorn thread); yields (url, state)."""
    import uvicorn

    from mlx_dgemma.server.app import create_app
    from mlx_dgemma.server.cli import build_parser, build_state

    port = free_port()
    argv = ["--model", str(folder), "--port", str(port), "--max-concurrency", str(max_concurrency),
            "--max-queue", str(max_queue), "--prompt-cache-size", str(prompt_cache_size)]
    argv += ["--context-length", str(context_length)] if context_length else []
    argv += ["--think"] if think else []
    args = build_parser().parse_args(argv)
    state = build_state(args, model, tokenizer, Path(folder))
    app = create_app(state, api_key=api_key, allowed_origins=allowed_origins.split(","))
    state.scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.scheduler.stop()


def scripted(monkeypatch, tokenizer, texts: list[str], canvas_length: int, eos_id: int):
    """Make the loop commit these replies, one per request, in order (token by token as the text spells it)."""
    from mlx_dgemma.server import scheduler

    replies = iter(texts)
    state = {"canvases": []}

    def fake_loop(model, cache, canvas, settings, rng, work, *, finished, drafts=False, **kw):
        if not state["canvases"]:
            ids = tokenizer.encode(next(replies), add_special_tokens=False) + [eos_id]
            ids += [0] * (-len(ids) % canvas_length)
            state["canvases"] = [ids[i:i + canvas_length] for i in range(0, len(ids), canvas_length)]
        rows = mx.array([state["canvases"].pop(0)] * canvas.shape[0])
        yield 1, rows.tolist() if drafts else None
        return rows, 1

    monkeypatch.setattr(scheduler, "canvas_loop", lambda settings: fake_loop)


def endless(monkeypatch, token_id: int, step_seconds: float = 0.05, steps: int = 4):
    """Make the loop slow and never end a reply (each canvas: `steps` steps of `step_seconds`, all `token_id`),
    so that a request is surely still running when a test disconnects or overflows the queue. Counts the
    canvases run in the returned dict."""
    from mlx_dgemma.server import scheduler

    seen = {"canvases": 0}

    def slow_loop(model, cache, canvas, settings, rng, work, *, finished, drafts=False, rows_to_keep=None, **kw):
        seen["canvases"] += 1
        rows = mx.full(canvas.shape, token_id, dtype=mx.int32)
        for step in range(1, steps + 1):
            time.sleep(step_seconds)
            yield step, None
            kept = rows_to_keep() if rows_to_keep is not None else None
            if kept is not None:
                rows = rows[mx.array(kept, dtype=mx.int32)] if kept else rows[:0]
                cache.select(kept)
                if not kept:
                    return rows, step
        return rows, steps

    monkeypatch.setattr(scheduler, "canvas_loop", lambda settings: slow_loop)
    return seen
