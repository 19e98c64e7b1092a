"""Ollama's shapes: `/api/chat` and `/api/generate` (NDJSON streams, streaming by default), and the probes
clients make first (`/api/version`, `/api/tags`, `/api/show`, `/api/ps`). Errors are `{"error": "message"}`;
durations are nanoseconds; tool-call arguments are objects."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

from starlette.responses import JSONResponse, StreamingResponse

from .request import parse_ollama_chat, parse_ollama_generate
from .runner import Generation

OLLAMA_VERSION = "0.12.0"  # the API level these routes follow


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _model_entry(state) -> dict:
    return {"name": state.model_name, "model": state.model_name, "modified_at": state.loaded_at,
            "size": state.weights_bytes, "digest": state.digest,
            "details": {"parent_model": "", "format": "mlx", "family": "diffusion_gemma",
                        "families": ["diffusion_gemma"], "parameter_size": state.parameter_size,
                        "quantization_level": state.quantization}}


async def version(request, state):
    return JSONResponse({"version": OLLAMA_VERSION})


async def tags(request, state):
    return JSONResponse({"models": [_model_entry(state)]})


async def ps(request, state):
    entry = _model_entry(state)
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    return JSONResponse({"models": [{**entry, "expires_at": expires, "size_vram": state.weights_bytes}]})


async def show(request, state, body: dict):
    entry = _model_entry(state)
    capabilities = ["completion"] + (["tools", "thinking"] if state.tokenizer.has_chat_template else []) \
        + (["vision"] if state.context.vision is not None else [])
    return JSONResponse({"modelfile": "", "parameters": "", "template": state.tokenizer.chat_template or "",
                         "details": entry["details"], "capabilities": capabilities, "modified_at": state.loaded_at,
                         "model_info": {"general.architecture": "diffusion_gemma",
                                        "diffusion_gemma.context_length": state.context.context_length,
                                        "diffusion_gemma.canvas_length": state.context.canvas_length}})


def _final(gen, started: float) -> dict:
    total = int((time.perf_counter() - started) * 1e9)
    prefill = int(gen.stats.get("prefill_seconds", 0.0) * 1e9)
    return {"done": True, "done_reason": gen.finish_reason, "total_duration": total, "load_duration": 0,
            "prompt_eval_count": len(gen.request.prompt_ids), "prompt_eval_duration": prefill,
            "eval_count": gen.text.used_tokens(), "eval_duration": max(0, total - prefill)}


def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _respond(request, state, req, shape):
    """`shape(text, thinking, tool_calls)` -> the per-line payload (a `message` or a `response`)."""
    started = time.perf_counter()
    gen = Generation(state, request.url.path, req)
    head = lambda: {"model": req.model, "created_at": _now()}  # noqa: E731
    if not req.stream:
        last = await gen.collect(request)
        if last.kind == "error":
            return JSONResponse({"error": last.text}, status_code=500)
        return JSONResponse({**head(), **shape(gen.text.content, gen.text.reasoning, gen.text.tool_calls),
                             **_final(gen, started)})

    async def lines():
        async for piece in gen.pieces():
            if piece.kind == "delta":
                d = piece.delta
                yield _ndjson({**head(), **shape(d.content, d.reasoning, d.tool_calls), "done": False})
            elif piece.kind == "error":
                yield _ndjson({"error": piece.text})
                return
            elif piece.kind == "done":
                yield _ndjson({**head(), **shape("", "", []), **_final(gen, started)})

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def chat(request, state, body: dict):
    def shape(text, thinking, calls):
        message = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [{"function": {"name": n, "arguments": a}} for n, a in calls]
        return {"message": message}

    return await _respond(request, state, parse_ollama_chat(body, state.context), shape)


async def generate(request, state, body: dict):
    def shape(text, thinking, calls):
        return {"response": text, **({"thinking": thinking} if thinking else {})}

    return await _respond(request, state, parse_ollama_generate(body, state.context), shape)
