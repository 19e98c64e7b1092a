"""Request bodies (OpenAI chat/completions, Ollama chat/generate) checked and turned into one `GenerationRequest`.

Every problem is a `RequestError` naming the field, raised before any generation starts. Fields that mean nothing
to block diffusion are rejected when set to anything but their neutral value (penalties, `logit_bias`, `n > 1`,
`logprobs`, `response_format`, forced tool choice); `temperature`, `top_p`, `top_k` and `min_p` are accepted and
ignored (the diffusion sampler's temperature schedule is `t_min`..`t_max`, which a request may set), as README
documents. The diffusion settings come as extra body fields (`steps`, `entropy_bound`, ...).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field

from ..chat_template import ChatTemplateError

ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_PARTS = ("image_url", "image", "input_image")
IGNORED = ("temperature", "top_p", "top_k", "min_p")
# body field -> SamplerConfig field (the diffusion settings a request may set)
DIFFUSION_FIELDS = {
    "steps": "max_denoising_steps", "max_denoising_steps": "max_denoising_steps", "entropy_bound": "entropy_bound",
    "t_min": "t_min", "t_max": "t_max", "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
}
# field -> its neutral value: anything else is refused (diffusion has no per-token distribution to bend)
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1,
           "logprobs": False, "top_logprobs": None, "echo": False, "suffix": None, "logit_bias": None}


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    prompt_text: str
    max_tokens: int
    model: str
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sampler: dict = field(default_factory=dict)  # SamplerConfig overrides
    sampler_name: str | None = None  # `sampler` body field, passed through to the generation API
    stream: bool = False
    include_usage: bool = False
    drafts: bool = False
    thinking: bool = False
    cache_points: list[int] = field(default_factory=list)  # prompt prefixes worth keeping in the prompt cache
    image_patches: list = field(default_factory=list)  # the prompt's images, read (vision.Patches), in order


@dataclass
class ServerContext:
    """What request parsing needs to know about the loaded model and the server's defaults."""

    tokenizer: object
    model_name: str
    canvas_length: int
    context_length: int
    default_max_tokens: int
    thinking_budget_factor: int = 1
    think: bool = False
    vision: object = None  # the model's vision.ImageEncoder, or None for a text-only model


def _typed(body: dict, name: str, kinds, what: str, default=None, where: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _as_tuple(kinds))
    if not ok:
        raise RequestError(f"{where}{name} must be {what}, got {json.dumps(value)[:60]}", param=where + name)
    return value


def _as_tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _positive_int(body, name, where=""):
    value = _typed(body, name, int, "a positive integer", where=where)
    if value is not None and value <= 0:
        raise RequestError(f"{where}{name} must be a positive integer, got {value}", param=where + name)
    return value


def _refuse_meaningless(body: dict):
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is None or value == neutral or (name == "logit_bias" and value == {}) or (name == "suffix" and value == ""):
            continue
        raise RequestError(f"{name}={json.dumps(value)[:40]} is not supported: block diffusion denoises whole canvases "
                           "and has no per-token distribution for it to act on", param=name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format is not supported (only {\"type\": \"text\"})", param="response_format",
                           code="unsupported_parameter")
    for name in IGNORED:
        _typed(body, name, (int, float), "a number")


def _sampler(body: dict) -> tuple[dict, str | None]:
    out = {}
    for name, target in DIFFUSION_FIELDS.items():
        kinds = int if target in ("max_denoising_steps", "stability_threshold") else (int, float)
        value = _typed(body, name, kinds, "an integer" if kinds is int else "a number")
        if value is not None:
            out[target] = value
    name = _typed(body, "sampler", str, "a string")
    return out, name


def _stops(value, param="stop") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError(f"{param} must be a string or a list of strings", param=param)
    if len(value) > 4:
        raise RequestError(f"{param} holds {len(value)} strings; at most 4", param=param)
    return [s for s in value if s]


def _image_source(part: dict, where: str) -> str:
    """The `data:` URL of an image part (`image_url` as OpenAI sends it, or `input_image` / `image`)."""
    value = part.get("image_url", part.get("image"))
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise RequestError(f"{where}: an image part needs image_url.url", param=where)
    if not url.startswith("data:"):
        raise RequestError(f"{where}: send images inline as data: URLs (data:image/png;base64,...); this server "
                           "fetches no URLs", param=where, code="unsupported_content")
    return url


def _content(content, where: str, images: list | None):
    """Text, or (with images, for a vision model) the parts the chat template places: images go to `images`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PARTS:
            if images is None:
                raise RequestError("images not supported by this model", param=f"{where}.content[{j}]",
                                   code="unsupported_content")
            images.append(_image_source(part, f"{where}.content[{j}]"))
            parts.append({"type": "image"})
            continue
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{j}]: unsupported content part {json.dumps(part)[:60]} "
                               "(expected {\"type\": \"text\", \"text\": ...})", param=f"{where}.content[{j}]")
        parts.append(part)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _ollama_images(m: dict, where: str, images: list | None) -> list[dict]:
    """Ollama's `images` (base64 strings) as image parts."""
    given = m.get("images") or []
    if not given:
        return []
    if images is None:
        raise RequestError("images not supported by this model", param=f"{where}.images", code="unsupported_content")
    for j, data in enumerate(given):
        try:
            images.append(base64.b64decode(data, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(f"{where}.images[{j}] is not base64", param=f"{where}.images[{j}]") from None
    return [{"type": "image"}] * len(given)


def _arguments(value, where: str):
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(f"{where}: arguments is not valid JSON", param=where) from None
        if isinstance(parsed, dict):
            return parsed
    raise RequestError(f"{where}: arguments must be a JSON object (or its JSON text)", param=where)


def normalize_messages(messages, ollama: bool = False, images: list | None = None) -> list[dict]:
    """Messages as the chat template takes them: text content (or parts, with images, which are collected into
    `images`; None: the model takes none), tool-call arguments as objects, tool results named after the call they
    answer, assistant reasoning under `reasoning`."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out, names = [], {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role: unknown role {json.dumps(role)} (expected one of {', '.join(ROLES)})",
                               param=f"{where}.role")
        content = _content(m.get("content"), where, images)
        if ollama:
            pictures = _ollama_images(m, where, images)
            content = [*pictures, {"type": "text", "text": content}] if pictures else content
        message = {"role": role, "content": content}
        reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
        if role == "assistant" and isinstance(reasoning, str) and reasoning:
            message["reasoning"] = reasoning
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            message["tool_calls"] = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where}.tool_calls[{j}] needs function.name", param=f"{where}.tool_calls[{j}]")
                args = _arguments(fn.get("arguments", {}), f"{where}.tool_calls[{j}].function")
                if isinstance(call.get("id"), str):
                    names[call["id"]] = fn["name"]
                message["tool_calls"].append({"id": call.get("id"), "type": "function",
                                              "function": {"name": fn["name"], "arguments": args}})
        if role == "tool":
            name = m.get("name") or m.get("tool_name") or names.get(m.get("tool_call_id"))
            message["name"] = name if isinstance(name, str) else "tool"
            if isinstance(m.get("tool_call_id"), str):
                message["tool_call_id"] = m["tool_call_id"]
            if not isinstance(message["content"], str):
                raise RequestError(f"{where}: a tool result is text", param=f"{where}.content")
        out.append(message)
    if not any(m["content"] or m.get("tool_calls") for m in out):
        raise RequestError("messages hold no text", param="messages")
    return out


def resolve_thinking(ctx: ServerContext, model_name: str, body: dict) -> tuple[bool, str]:
    """Thinking on/off: a `:think` / `:think=false` / `:nothink` model suffix, then `chat_template_kwargs`,
    `enable_thinking`, `reasoning_effort` (Ollama: `think`), then the server's default. Returns (on, model)."""
    base, _, suffix = model_name.partition(":")
    if suffix in ("think", "think=true"):
        return True, base
    if suffix in ("think=false", "nothink"):
        return False, base
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    for name, value in (("chat_template_kwargs.enable_thinking", kwargs.get("enable_thinking")),
                        ("enable_thinking", body.get("enable_thinking"))):
        if value is not None:
            if not isinstance(value, bool):
                raise RequestError(f"{name} must be true or false", param=name)
            return value, model_name
    effort = body.get("reasoning_effort", body.get("think"))
    if effort is not None:
        if isinstance(effort, bool):
            return effort, model_name
        if effort in ("none", "minimal"):
            return False, model_name
        if effort in ("low", "medium", "high", "max"):
            return True, model_name
        raise RequestError(f"reasoning_effort {json.dumps(effort)} is not one of none, minimal, low, medium, high",
                           param="reasoning_effort")
    return ctx.think, model_name


def _tools(body: dict) -> list | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}}",
                           param="tools")
    if choice in (None, "auto"):
        return tools
    if choice == "none":
        return None
    raise RequestError("tool_choice can be \"auto\" or \"none\": a diffusion model cannot be forced to call a tool",
                       param="tool_choice", code="unsupported_parameter")


def _finish(ctx: ServerContext, ids: list[int], text: str, max_tokens: int | None, thinking: bool, **kw):
    if not ids:
        raise RequestError("the prompt is empty", param="messages")
    if max_tokens is None:
        max_tokens = ctx.default_max_tokens * (ctx.thinking_budget_factor if thinking else 1)
    canvases = math.ceil(max_tokens / ctx.canvas_length)
    needed = len(ids) + canvases * ctx.canvas_length
    if needed > ctx.context_length:
        raise RequestError(
            f"Request needs {needed} context tokens ({len(ids)} prompt + {canvases} canvases of {ctx.canvas_length} "
            f"for max_tokens={max_tokens}), but the model's context is {ctx.context_length} tokens",
            param="max_tokens" if len(ids) < ctx.context_length else "messages", code="context_length_exceeded")
    return GenerationRequest(prompt_ids=list(ids), prompt_text=text, max_tokens=max_tokens, thinking=thinking, **kw)


def _with_images(ctx: ServerContext, ids: list[int], images: list) -> tuple[list[int], list]:
    """Read the images (before anything runs: a bad one is a 400) and expand their placeholders to soft tokens."""
    if not images:
        return ids, []
    from ..vision import ImageError, expand_image_tokens

    encoder = ctx.vision
    try:
        patches = encoder.process(images)
        ids = expand_image_tokens(ids, [p.soft_tokens for p in patches], encoder.boi_token_id,
                                  encoder.image_token_id, encoder.eoi_token_id)
    except ImageError as e:
        raise RequestError(str(e), param="messages", code="invalid_image") from None
    return ids, patches


def _render(ctx: ServerContext, messages, thinking: bool, tools, kwargs: dict) -> tuple[list[int], str, list[int]]:
    tok = ctx.tokenizer
    extra = {k: v for k, v in kwargs.items() if k != "enable_thinking"}
    if tools is not None:
        extra["tools"] = tools
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                       enable_thinking=thinking, **extra)
        # the end of the conversation before the generation prompt: what the next turn's prompt will share
        head = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False,
                                       enable_thinking=thinking, **extra)
    except ChatTemplateError as e:
        raise RequestError(f"the chat template rejected the messages: {e}", param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    point = len(tok.encode(head, add_special_tokens=False)) if text.startswith(head) else 0
    return ids, text, [point] if 0 < point < len(ids) else []


def _common(body: dict, ctx: ServerContext) -> dict:
    _refuse_meaningless(body)
    sampler, sampler_name = _sampler(body)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    return dict(
        stop=_stops(body.get("stop")), seed=_typed(body, "seed", int, "an integer"), sampler=sampler,
        sampler_name=sampler_name, stream=bool(_typed(body, "stream", bool, "true or false", False)),
        include_usage=bool(_typed(options, "include_usage", bool, "true or false", False, "stream_options.")),
        drafts=bool(_typed(body, "drafts", bool, "true or false", False)),
    )


def _model_name(body: dict, ctx: ServerContext) -> str:
    return _typed(body, "model", str, "a string", ctx.model_name) or ctx.model_name


def parse_chat(body: dict, ctx: ServerContext) -> GenerationRequest:
    """An OpenAI `/v1/chat/completions` body."""
    common = _common(body, ctx)
    thinking, model = resolve_thinking(ctx, _model_name(body, ctx), body)
    images = [] if ctx.vision is not None else None
    messages = normalize_messages(body.get("messages"), images=images)
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    ids, text, points = _render(ctx, messages, thinking, _tools(body), body.get("chat_template_kwargs") or {})
    ids, patches = _with_images(ctx, ids, images)
    return _finish(ctx, ids, text, max_tokens, thinking, model=model, cache_points=[] if patches else points,
                   image_patches=patches, **common)


def parse_completion(body: dict, ctx: ServerContext) -> GenerationRequest:
    """An OpenAI `/v1/completions` body: the prompt as is (no chat template)."""
    common = _common(body, ctx)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids, text = ctx.tokenizer.encode(prompt), prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0 or max(prompt) >= ctx.tokenizer.vocab_size:
            raise RequestError(f"prompt token ids must lie in [0, {ctx.tokenizer.vocab_size})", param="prompt")
        ids, text = prompt, ctx.tokenizer.decode(prompt)
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a list holding one of those", param="prompt")
    return _finish(ctx, ids, text, _positive_int(body, "max_tokens"), False, model=_model_name(body, ctx), **common)


def _ollama_options(body: dict) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError("options must be an object", param="options")
    for name in IGNORED:
        _typed(options, name, (int, float), "a number", where="options.")
    if body.get("format"):
        raise RequestError("format (structured output) is not supported", param="format", code="unsupported_parameter")
    predict = _typed(options, "num_predict", int, "an integer", where="options.")
    sampler, sampler_name = _sampler({**options, **{k: v for k, v in body.items() if k in (*DIFFUSION_FIELDS, "sampler")}})
    return dict(
        max_tokens=predict if predict is not None and predict > 0 else None,
        common=dict(stop=_stops(options.get("stop"), "options.stop"),
                    seed=_typed(options, "seed", int, "an integer", where="options."), sampler=sampler,
                    sampler_name=sampler_name, stream=bool(_typed(body, "stream", bool, "true or false", True))),
    )


def parse_ollama_chat(body: dict, ctx: ServerContext) -> GenerationRequest:
    opts = _ollama_options(body)
    thinking, model = resolve_thinking(ctx, _model_name(body, ctx), body)
    images = [] if ctx.vision is not None else None
    messages = normalize_messages(body.get("messages"), ollama=True, images=images)
    ids, text, points = _render(ctx, messages, thinking, _tools(body), {})
    ids, patches = _with_images(ctx, ids, images)
    return _finish(ctx, ids, text, opts["max_tokens"], thinking, model=model, cache_points=[] if patches else points,
                   image_patches=patches, **opts["common"])


def parse_ollama_generate(body: dict, ctx: ServerContext) -> GenerationRequest:
    opts = _ollama_options(body)
    prompt = _typed(body, "prompt", str, "a string", "")
    if body.get("images"):  # a prompt's images go through the chat route
        return parse_ollama_chat({**body, "messages": [
            *([{"role": "system", "content": body["system"]}] if body.get("system") else []),
            {"role": "user", "content": prompt, "images": body["images"]}]}, ctx)
    if _typed(body, "raw", bool, "true or false", False):
        ids, text = ctx.tokenizer.encode(prompt), prompt
        return _finish(ctx, ids, text, opts["max_tokens"], False, model=_model_name(body, ctx), **opts["common"])
    thinking, model = resolve_thinking(ctx, _model_name(body, ctx), body)
    system = _typed(body, "system", str, "a string")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if not prompt:
        raise RequestError("prompt is empty", param="prompt")
    ids, text, points = _render(ctx, messages, thinking, None, {})
    return _finish(ctx, ids, text, opts["max_tokens"], thinking, model=model, cache_points=points, **opts["common"])
