"""The HTTP server against the real `openai` client (and plain HTTP), on the tiny checkpoint in this process."""

import contextlib
import json
import shutil
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package brings
import openai
import pytest

from server_fixtures import add_char_tokenizer, endless, running_server, scripted

CONTEXT = 400  # the test server's context limit (tokens), so that an oversize prompt is cheap to make


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("server-model")
    shutil.copytree(tiny[0], out, dirs_exist_ok=True)
    vocab = add_char_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": 70}))  # small images
    return out, vocab


@pytest.fixture(scope="module")
def loaded(folder):
    from mlx_dgemma.loading import load

    return load(str(folder[0]))


@pytest.fixture(scope="module")
def server(loaded, folder):
    with running_server(*loaded, folder[0], context_length=CONTEXT) as (url, state):
        yield url, state


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(client, text, **kw):
    return client.chat.completions.create(model="anything", messages=[{"role": "user", "content": text}], **kw)


def streamed(client, text, **kw):
    content, reasoning, finish, usage, calls = "", "", None, None, []
    for chunk in chat(client, text, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return content, reasoning, finish, usage, calls


# --- answers ---------------------------------------------------------------------------------------------------


def test_chat_streaming_equals_non_streaming(client):
    whole = chat(client, "hello there", seed=3, max_tokens=40)
    content, _, finish, usage, _ = streamed(client, "hello there", seed=3, max_tokens=40)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert content == (whole.choices[0].message.content or "")
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_drafts_only_in_the_extension_field(server):
    body = {"messages": [{"role": "user", "content": "draw"}], "seed": 9, "max_tokens": 40}
    whole = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60).json()
    drafts, content = [], ""
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json={**body, "stream": True, "drafts": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                drafts += [delta["x_diffusion_draft"]] if "x_diffusion_draft" in delta else []
                content += delta.get("content") or ""
    assert len(drafts) >= 2  # one per denoising step
    assert content == (whole["choices"][0]["message"]["content"] or "")  # drafts change nothing committed


def test_completions_and_seeds(client):
    a = client.completions.create(model="m", prompt="abc", seed=5, max_tokens=20)
    b = client.completions.create(model="m", prompt="abc", seed=5, max_tokens=20)
    text = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="abc", seed=5,
                                                                       max_tokens=20, stream=True))
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text == text


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33])
def test_max_tokens_is_exact(client, n):
    r = client.completions.create(model="m", prompt="count", seed=n, max_tokens=n)
    assert r.usage.completion_tokens <= n
    assert (r.usage.completion_tokens == n) == (r.choices[0].finish_reason == "length")
    r = chat(client, "count", seed=n, max_completion_tokens=n, max_tokens=10_000)  # max_completion_tokens wins
    assert r.usage.completion_tokens <= n


def test_stop_string_across_canvas_boundary(client, server):
    C = server[1].context.canvas_length
    for seed in range(11, 60):  # a reply whose first canvas + 2 tokens are plain characters (one per token)
        text = client.completions.create(model="m", prompt="xyz", seed=seed, max_tokens=3 * C).choices[0].text
        if len(text) >= C + 3 and "<" not in text[:C + 2]:
            break
    else:
        pytest.fail("no seed gave a plain-text start")
    stop = text[C - 2:C + 2]  # spans the first canvas boundary
    r = client.completions.create(model="m", prompt="xyz", seed=seed, max_tokens=3 * C, stop=[stop, "never here"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.usage.completion_tokens == text.index(stop) + len(stop)


def test_reasoning_split(client, server, loaded, monkeypatch, folder):
    vocab = folder[1]
    C = server[1].context.canvas_length
    # the canvas boundary (16 tokens) falls inside the label "thought": it must still be recognised
    reply = "<|channel>thought\nWhy? Because.<channel|>Blue."
    scripted(monkeypatch, loaded[1], [reply, reply], C, vocab["<turn|>"])
    whole = chat(client, "why", extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = whole.choices[0].message
    assert message.content == "Blue."
    assert message.reasoning_content == message.reasoning == "Why? Because."
    content, reasoning, finish, usage, _ = streamed(client, "why", extra_body={"enable_thinking": True})
    assert (content, reasoning, finish) == ("Blue.", "Why? Because.", "stop")
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_tool_call_round_trip(client, server, loaded, monkeypatch, folder):
    vocab = folder[1]
    C = server[1].context.canvas_length
    call = '<|tool_call>call:get_weather{city:<|"|>Oslo, NO<|"|>,days:3}<tool_call|>'
    scripted(monkeypatch, loaded[1], [call, call, "It is sunny."], C, vocab["<|tool_response>"])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = chat(client, "weather in Oslo?", tools=tools, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Oslo, NO", "days": 3}
    content, _, finish, usage, calls = streamed(client, "weather in Oslo?", tools=tools, max_tokens=200)
    assert finish == "tool_calls" and content == "" and usage is not None
    assert calls[0].index == 0 and calls[0].function.name == "get_weather"

    prompts = []
    submit = server[1].scheduler.submit
    monkeypatch.setattr(server[1].scheduler, "submit", lambda req, loop: prompts.append(req.prompt_text) or submit(req, loop))
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": tc.id, "type": "function", "function": {"name": "get_weather", "arguments": tc.function.arguments}}]},
                {"role": "tool", "tool_call_id": tc.id, "content": "sunny"}]
    r = client.chat.completions.create(model="m", messages=messages, tools=tools)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    assert '<|tool_call>call:get_weather{city:<|"|>Oslo, NO<|"|>,days:3}<tool_call|>' in prompts[0]
    assert '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>' in prompts[0]


def test_prompt_cache_reuse(client, server):
    first = chat(client, "first turn", seed=1, max_tokens=16)
    messages = [{"role": "user", "content": "first turn"},
                {"role": "assistant", "content": first.choices[0].message.content or "ok"},
                {"role": "user", "content": "second turn"}]
    warm = client.chat.completions.create(model="m", messages=messages, seed=2, max_tokens=16)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    server[1].scheduler.prompt_cache._entries.clear()
    cold = client.chat.completions.create(model="m", messages=messages, seed=2, max_tokens=16)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content


# --- Ollama ----------------------------------------------------------------------------------------------------


def test_ollama_routes(server):
    url = server[0]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/").text == "Ollama is running"
        assert "version" in http.get("/api/version").json()
        (entry,) = http.get("/api/tags").json()["models"]
        assert entry["name"] and entry["details"]["family"] == "diffusion_gemma"
        assert http.get("/api/ps").json()["models"][0]["name"] == entry["name"]
        assert "completion" in http.post("/api/show", json={"model": entry["name"]}).json()["capabilities"]
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "options": {"seed": 4, "num_predict": 20}}
        whole = http.post("/api/chat", json={**body, "stream": False}).json()
        assert whole["done"] is True and whole["eval_count"] <= 20 and whole["message"]["role"] == "assistant"
        with http.stream("POST", "/api/chat", json=body) as r:  # streams by default, as NDJSON
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
        assert "".join(x["message"]["content"] for x in lines) == whole["message"]["content"]
        gen = http.post("/api/generate", json={"model": "x", "prompt": "hi", "stream": False,
                                               "options": {"seed": 4, "num_predict": 20}}).json()
        assert gen["response"] == whole["message"]["content"]  # the same prompt through the same template
        bad = http.post("/api/chat", json={"model": "x", "messages": []})
        assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


# --- trust -----------------------------------------------------------------------------------------------------


def test_api_key_and_cors(loaded, folder):
    with running_server(*loaded, folder[0], api_key="sekrit", allowed_origins="http://ok.example") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), "hi", max_tokens=4)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/health").json()["status"] == "ok"  # open without a key
        good = chat(openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0), "hi", max_tokens=4)
        assert good.usage.completion_tokens <= 4
        pre = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code in (200, 204)
        assert pre.headers["access-control-allow-origin"] == "http://ok.example"
        other = httpx.get(url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


BAD_BODIES = [
    ("not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x.example/a.png"}}]}]},
     "messages[0].content[0]", "data: URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages", "image"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}, "max_tokens", "positive integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "positive integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature", "number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, "max_tokens", "context"),
    ({"messages": [{"role": "user", "content": "x" * CONTEXT}]}, "messages", "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format",
     "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "cannot be forced"),
    ({"messages": [{"role": "user", "content": "hi"}], "steps": 0}, "max_denoising_steps", "positive"),
    ({"messages": [{"role": "user", "content": "hi"}], "sampler": "no-such-sampler"}, "sampler", "sampler"),
]


@pytest.mark.parametrize("body,param,words", BAD_BODIES)
def test_bad_requests_get_400(server, body, param, words):
    for stream in (False, True):
        if isinstance(body, dict):
            r = httpx.post(server[0] + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        else:
            r = httpx.post(server[0] + "/v1/chat/completions", content=body, timeout=30)
        assert r.status_code == 400, r.text  # before any stream starts
        error = r.json()["error"]
        assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_failure_mid_generation(server, client, monkeypatch):
    from mlx_dgemma.server import scheduler

    def broken(model, cache, canvas, settings, rng, work, **kw):
        raise RuntimeError("the accelerator fell off")
        yield  # a generator, like the real loop

    monkeypatch.setattr(scheduler, "canvas_loop", lambda settings: broken)
    r = httpx.post(server[0] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and "fell off" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    with pytest.raises(openai.APIError, match="fell off"):  # one error event in the stream, then [DONE]
        for _ in chat(client, "hi", stream=True):
            pass
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "error" in json.loads(lines[-2][6:]) and lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert chat(client, "hi", max_tokens=4).usage.completion_tokens <= 4  # the server goes on
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_unknown_routes_and_health(server, client):
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server[0] + "/v1/chat/completions").status_code == 405
    models = client.models.list()
    assert models.data[0].id and client.models.retrieve("whatever-name").id == "whatever-name"
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


# --- batching --------------------------------------------------------------------------------------------------


def _in_threads(fn, args):
    results = [None] * len(args)

    def run(i):
        results[i] = fn(*args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_eight_seeded_requests_batched_equal_alone(client, server):
    prompts = [("hello", 1), ("why is the sky blue", 2), ("a", 3), ("abc abc abc abc", 4), ("the sky", 5),
               ("long " * 12, 6), ("b", 7), ("q?", 8)]

    def ask(text, seed):
        r = chat(client, text, seed=seed, max_tokens=40)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(*p) for p in prompts]
    before = server[1].scheduler.largest_batch
    together = _in_threads(ask, prompts)
    assert together == alone
    assert server[1].scheduler.largest_batch > 1 or before > 1  # they really shared a batch


def _wait_idle(url, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        h = httpx.get(url + "/health").json()
        if h["running"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {h}")


def test_disconnect_mid_stream_frees_the_row(server, client, monkeypatch, folder):
    url = server[0]
    seen = endless(monkeypatch, folder[1]["a"])
    body = {"messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 300, "seed": 1}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content": "a' in line:
                    break  # the first committed text: then the client goes away
    _wait_idle(url)
    assert seen["canvases"] < 300 // server[1].context.canvas_length  # it stopped long before its budget
    monkeypatch.undo()
    assert chat(client, "still there?", max_tokens=4).usage.completion_tokens <= 4


def test_disconnect_while_waiting_for_a_whole_reply(server, monkeypatch, folder):
    seen = endless(monkeypatch, folder[1]["a"])
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 300}
    with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
        httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=0.5)
    _wait_idle(server[0])
    assert seen["canvases"] < 300 // server[1].context.canvas_length  # cancelled, not run to its budget


def test_queue_overflow_gets_429(loaded, folder, monkeypatch):
    endless(monkeypatch, folder[1]["a"])
    with running_server(*loaded, folder[0], max_concurrency=1, max_queue=1) as (url, state):
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 300}
        with httpx.Client(timeout=30) as http, contextlib.ExitStack() as streams:
            for _ in range(2):  # one running, one queued
                streams.enter_context(http.stream("POST", url + "/v1/chat/completions", json=body))
            assert httpx.get(url + "/health").json()["running"] + httpx.get(url + "/health").json()["queued"] == 2
            third = http.post(url + "/v1/chat/completions", json=body)
            assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["type"] == "rate_limit_error"
        _wait_idle(url)
        assert httpx.get(url + "/health").json()["status"] == "ok"

# --- images ----------------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_images(client, server, monkeypatch):
    import base64

    data = base64.b64encode(_png(1)).decode()
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
             {"type": "text", "text": "what is it"}]
    text_only = chat(client, "what is it", seed=1, max_tokens=8)
    first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}], seed=1,
                                           max_tokens=8)
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}], seed=1,
                                           max_tokens=8)
    encoder = server[1].model.vision
    soft = encoder.process([_png(1)])[0].soft_tokens
    # the placeholder became boi + soft tokens + eoi
    assert first.usage.prompt_tokens == text_only.usage.prompt_tokens + soft + 2
    assert again.choices[0].message.content == first.choices[0].message.content
    with httpx.Client(base_url=server[0], timeout=60) as http:
        assert "vision" in http.post("/api/show", json={"model": "m"}).json()["capabilities"]
        r = http.post("/api/chat", json={"model": "m", "stream": False, "options": {"seed": 1, "num_predict": 8},
                                         "messages": [{"role": "user", "content": "what is it", "images": [data]}]})
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == first.usage.prompt_tokens
        monkeypatch.setattr(server[1].context, "vision", None)  # as for a text-only model
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 400 and r.json()["error"]["message"] == "images not supported by this model"


# --- the command line ------------------------------------------------------------------------------------------


def test_command_line_serves_the_demo_model(tmp_path):
    import os
    import subprocess
    import sys

    from server_fixtures import free_port

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = subprocess.run([sys.executable, "-m", "mlx_dgemma.server", "--max-concurrency", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--max-concurrency must be positive" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_dgemma.server", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["model"] == "mlx_dgemma-demo"  # no --model: the bundled demo model
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="whatever", messages=[{"role": "user", "content": "sort 7 2 9 4 1"}], seed=1)
        assert reply.choices[0].message.content == "1 2 4 7 9"
    finally:
        proc.terminate()
        proc.wait(30)
