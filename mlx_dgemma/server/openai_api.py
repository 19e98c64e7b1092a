"""OpenAI's shapes: `/v1/chat/completions` and `/v1/completions`, whole or as server-sent events.

`content` carries committed text only; reasoning goes to both `reasoning_content` and `reasoning`; tool calls to
`tool_calls` (arguments as a JSON string). With `"drafts": true` a stream also carries each denoising step's
canvas in the `x_diffusion_draft` field of an otherwise empty delta (replace, not append).
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from .request import parse_chat, parse_completion
from .runner import Generation

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _tool_calls(calls, start: int = 0, stream: bool = False) -> list[dict]:
    out = []
    for i, (name, arguments) in enumerate(calls, start):
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        out.append({"index": i, **call} if stream else call)
    return out


def _chat_delta(delta) -> dict:
    out = {}
    if delta.reasoning:
        out["reasoning_content"] = out["reasoning"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    return out


def _failed(message: str) -> JSONResponse:
    """A generation that failed (not the request's fault, and no better on a retry)."""
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": None}},
                        status_code=500, headers={"x-should-retry": "false"})


def stream_error(message: str) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}}) + _sse("[DONE]")


async def chat_completions(request, state, body: dict):
    req = parse_chat(body, state.context)
    gen = Generation(state, request.url.path, req)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": req.model}
    if not req.stream:
        last = await gen.collect(request)
        if last.kind == "error":
            return _failed(last.text)
        message = {"role": "assistant", "content": gen.text.content or (None if gen.text.tool_calls else "")}
        if gen.text.reasoning:
            message["reasoning_content"] = message["reasoning"] = gen.text.reasoning
        if gen.text.tool_calls:
            message["tool_calls"] = _tool_calls(gen.text.tool_calls)
        return JSONResponse({**head, "object": "chat.completion", "usage": gen.usage(), "choices": [
            {"index": 0, "message": message, "finish_reason": gen.finish_reason, "logprobs": None}]})

    async def events():
        chunk = {**head, "object": "chat.completion.chunk"}

        def choice(delta, finish=None):
            return _sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        yield choice({"role": "assistant", "content": ""})
        calls = 0
        async for piece in gen.pieces(keepalive=True):
            if piece.kind == "keepalive":
                yield ": keepalive\n\n"
            elif piece.kind == "draft":
                yield choice({"x_diffusion_draft": piece.text})
            elif piece.kind == "delta":
                delta = _chat_delta(piece.delta)
                if piece.delta.tool_calls:
                    delta["tool_calls"] = _tool_calls(piece.delta.tool_calls, calls, stream=True)
                    calls += len(piece.delta.tool_calls)
                if delta:
                    yield choice(delta)
            elif piece.kind == "error":
                yield stream_error(piece.text)
                return
            else:
                yield choice({}, piece.finish_reason)
        if req.include_usage:
            yield _sse({**chunk, "choices": [], "usage": gen.usage()})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def completions(request, state, body: dict):
    req = parse_completion(body, state.context)
    gen = Generation(state, request.url.path, req, raw=True)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model}
    if not req.stream:
        last = await gen.collect(request)
        if last.kind == "error":
            return _failed(last.text)
        return JSONResponse({**head, "usage": gen.usage(), "choices": [
            {"index": 0, "text": gen.text.content, "finish_reason": gen.finish_reason, "logprobs": None}]})

    async def events():
        def choice(text, finish=None, **extra):
            return _sse({**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None,
                                              **extra}]})

        async for piece in gen.pieces(keepalive=True):
            if piece.kind == "keepalive":
                yield ": keepalive\n\n"
            elif piece.kind == "draft":
                yield choice("", x_diffusion_draft=piece.text)
            elif piece.kind == "delta":
                yield choice(piece.delta.content)
            elif piece.kind == "error":
                yield stream_error(piece.text)
                return
            else:
                yield choice("", piece.finish_reason)
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": gen.usage()})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
