"""The HTTP app: routes for the OpenAI and Ollama shapes, the API key, CORS, and errors in each API's shape.

Built on Starlette (an ASGI toolkit, served by uvicorn): routing, streaming responses that notice a client going
away, and CORS, with nothing between a request body and our own validation (errors keep OpenAI's shape).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass

import mlx.core as mx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from . import ollama_api, openai_api
from .errors import RequestError
from .request import ServerContext
from .runner import Overloaded
from .scheduler import Scheduler

log = logging.getLogger("mlx_dgemma.server")
OPEN_PATHS = ("/health", "/")


@dataclass
class ServerState:
    model: object
    tokenizer: object
    scheduler: Scheduler
    context: ServerContext
    model_name: str
    loaded_at: str = ""
    weights_bytes: int = 0
    parameter_size: str = ""
    quantization: str = "none"
    digest: str = ""
    retry_after: int = 2
    created: int = 0


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, status: int, message: str, param=None, code=None, type="invalid_request_error",
                   headers=None):
    if _is_ollama(path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on every route but /health (and CORS preflights, answered before this)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS \
                or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            message = "missing API key" if not given else "invalid API key"
            response = error_response(scope["path"], 401, message, code="invalid_api_key",
                                      type="authentication_error", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _post(handler):
    async def endpoint(request):
        state = request.app.state.server
        try:
            return await handler(request, state, await _body(request))
        except Overloaded as e:
            return error_response(request.url.path, 429, e.message, code=e.code, type=e.type,
                                  headers={"Retry-After": str(e.retry_after)})
        except RequestError as e:
            return error_response(request.url.path, e.status, e.message, e.param, e.code, e.type)
    return endpoint


def _get(handler):
    async def endpoint(request):
        return await handler(request, request.app.state.server)
    return endpoint


async def health(request, state):
    alive = state.scheduler.alive
    body = {"status": "ok" if alive else "error", "model": state.model_name,
            "thinking_default": state.context.think, "context_length": state.context.context_length,
            "canvas_length": state.context.canvas_length, **state.scheduler.load(),
            "prompt_cache_entries": len(state.scheduler.prompt_cache),
            "memory_gb": {"active": mx.get_active_memory() / 1e9, "peak": mx.get_peak_memory() / 1e9,
                          "cache": mx.get_cache_memory() / 1e9}}
    return JSONResponse(body, status_code=200 if alive else 503)


def _model_card(state, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "mlx_dgemma"}


async def models(request, state):
    names = [state.model_name]
    if state.tokenizer.has_chat_template:
        names += [f"{state.model_name}:think", f"{state.model_name}:think=false"]
    return JSONResponse({"object": "list", "data": [_model_card(state, n) for n in names]})


async def model(request, state):
    return JSONResponse(_model_card(state, request.path_params["name"]))  # any name is served by the loaded model


async def ollama_root(request, state):
    return PlainTextResponse("Ollama is running")


async def _http_error(request, exc: HTTPException):
    messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(request.url.path, exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                          type="not_found_error" if exc.status_code == 404 else "invalid_request_error")


async def _server_error(request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                          headers={"x-should-retry": "false"})


def create_app(state: ServerState, *, api_key: str | None = None, allowed_origins=("*",)) -> Starlette:
    state.created = state.created or int(time.time())
    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/chat/completions", _post(openai_api.chat_completions), methods=["POST"]),
            Route(f"{prefix}/completions", _post(openai_api.completions), methods=["POST"]),
            Route(f"{prefix}/models", _get(models), methods=["GET"]),
            Route(prefix + "/models/{name:path}", _get(model), methods=["GET"]),
        ]
    routes += [
        Route("/health", _get(health), methods=["GET"]),
        Route("/v1/health", _get(health), methods=["GET"]),
        Route("/", _get(ollama_root), methods=["GET", "HEAD"]),
        Route("/api/version", _get(ollama_api.version), methods=["GET"]),
        Route("/api/tags", _get(ollama_api.tags), methods=["GET"]),
        Route("/api/ps", _get(ollama_api.ps), methods=["GET"]),
        Route("/api/show", _post(ollama_api.show), methods=["POST"]),
        Route("/api/chat", _post(ollama_api.chat), methods=["POST"]),
        Route("/api/generate", _post(ollama_api.generate), methods=["POST"]),
    ]
    middleware = [
        Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"],
                   max_age=600),
        Middleware(APIKeyMiddleware, api_key=api_key),
    ]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    return app
