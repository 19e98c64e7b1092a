"""Images through ChatSession and the command lines (generate, chat), on a tiny checkpoint with a word tokenizer
that knows the image markers."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_dgemma
from mlx_dgemma.diffusion import prefill
from mlx_dgemma.session import ChatSession
from mlx_dgemma.text_generation import stream_generate
from reference import DISCRIMINATING_VISION, add_word_tokenizer
from test_vision_prompt import BOI, BUDGET, EOI, IMAGE, IMAGES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def folder(reference_factory, tmp_path_factory):
    source, _ = reference_factory("vision", vision=DISCRIMINATING_VISION)
    out = tmp_path_factory.mktemp("vision-chat")
    shutil.copytree(source, out, dirs_exist_ok=True)
    (out / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": BUDGET}))
    add_word_tokenizer(out, image_tokens=True)
    IMAGES[0].save(out / "picture.png")
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return mlx_dgemma.load(folder)


def image_runs(ids):
    """(start, length) of each run of image tokens, each checked to sit between boi and eoi."""
    ids, runs, i = list(ids), [], 0
    while i < len(ids):
        if ids[i] == IMAGE:
            j = i
            while j < len(ids) and ids[j] == IMAGE:
                j += 1
            assert ids[i - 1] == BOI and ids[j] == EOI
            runs.append((i, j - i))
            i = j
        i += 1
    return runs


def test_session_keeps_images_and_reuses_the_cache(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, seed=3, max_tokens=16, max_denoising_steps=3)
    first = session.send("hello", images=[IMAGES[0]])
    alone = [r.tokens for r in stream_generate(model, tokenizer, "hello", 16, images=[IMAGES[0]], seed=3,
                                                max_denoising_steps=3)]
    assert first.tokens == sum(alone, [])  # the first turn is the one-shot generation
    assert [n for _, n in image_runs(session.cached_tokens)] == [63]
    second = session.send("why", images=[IMAGES[1]])
    assert second.reused_tokens > 63 and [n for _, n in image_runs(session.cached_tokens)] == [63, 64]
    parts = [p for m in session.history if m["role"] == "user" for p in m["content"] if p.get("type") == "image"]
    assert [p["image"] for p in parts] == IMAGES

    # the cache built turn by turn equals one encode of the whole conversation with both images
    ids = np.array([session.cached_tokens])
    features = model.vision.features(model.vision.process(IMAGES))
    fresh = model.make_cache()
    prefill(model, mx.array(ids), fresh, images=model.vision.prompt_images(ids, features))
    canvas = mx.array(np.arange(16)[None] + 40)
    assert float(mx.abs(model.denoise(canvas, session.cache) - model.denoise(canvas, fresh)).max()) < 1e-5


def test_session_image_errors_leave_the_chat_usable(loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, seed=1, max_tokens=16, max_denoising_steps=2)
    with pytest.raises(ValueError, match="nothing.png: file not found"):
        session.send("hello", images=[tmp_path / "nothing.png"])
    assert session.history == [] and not session.running
    assert session.send("hello").tokens


def test_image_markers_a_reply_writes_stay_out_of_the_history(loaded, monkeypatch):
    # A reply is text: image markers in it would be read back as one more image placeholder than images given.
    model, tokenizer = loaded
    from mlx_dgemma import session as session_module
    from mlx_dgemma.text_generation import GenerationResponse

    reply = [*tokenizer.encode("hello", add_special_tokens=False), BOI, IMAGE, EOI]

    def scripted(*args, **kwargs):
        yield GenerationResponse(text=tokenizer.decode(reply), tokens=reply, finish_reason="length")

    session = ChatSession(model, tokenizer, seed=0, max_tokens=16, max_denoising_steps=2)
    monkeypatch.setattr(session_module, "stream_generate", scripted)
    session.send("hello", images=[IMAGES[0]])
    monkeypatch.undo()
    assert not any(t in tokenizer.encode(session.history[-1]["content"], add_special_tokens=False)
                   for t in (BOI, IMAGE, EOI))
    assert session.send("why").tokens  # the next turn renders one placeholder for the one image


def run(module, *args, stdin=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", f"mlx_dgemma.{module}", *map(str, args)], capture_output=True,
                          text=True, env=env, input=stdin, timeout=300)


def test_generate_cli_with_images(folder, tmp_path):
    r = run("generate", "--model", folder, "--image", folder / "picture.png", "--image", folder / "picture.png",
            "-p", "hello", "-m", "16", "--steps", "2", "--seed", "0")
    assert r.returncode == 0, r.stderr
    # 2 x (63 image tokens + boi + eoi) on top of the text prompt
    text_only = run("generate", "--model", folder, "-p", "hello", "-m", "16", "--steps", "2", "--seed", "0")
    tokens = [int(line.split()[1]) for out in (r, text_only) for line in out.stdout.splitlines() if line.startswith("Prompt:")]
    assert tokens[0] - tokens[1] == 2 * 65  # each placeholder became boi + 63 image tokens + eoi
    bad = run("generate", "--model", folder, "--image", tmp_path / "missing.png", "-p", "hi")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: image") and "file not found" in bad.stderr
    assert "Traceback" not in bad.stderr
    demo = run("generate", "--image", folder / "picture.png", "-p", "hi")
    assert demo.returncode == 1 and "takes text only" in demo.stderr and "Traceback" not in demo.stderr


def test_chat_cli_with_images(folder, tmp_path):
    r = run("chat", "--model", folder, "-m", "16", "--steps", "2", "--seed", "0", "--image", folder / "picture.png",
            stdin=f"hello\n/image {tmp_path / 'missing.png'}\n/image {folder / 'picture.png'}\nwhy\n")
    assert r.returncode == 0, r.stderr
    assert "missing.png: file not found" in r.stdout
    assert f"[image {folder / 'picture.png'}: 63 soft tokens, sent with the next message]" in r.stdout
    assert r.stdout.count("tokens/forward") == 2  # both turns answered
