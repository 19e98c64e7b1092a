"""Request bodies (OpenAI chat/completions, Ollama chat/generate) checked and turned into one `GenerationRequest`.

Every problem is a `RequestError` naming the field, raised before any generation starts. Fields that mean nothing
to block diffusion are rejected when set to anything but their neutral value (penalties, `logit_bias`, `n > 1`,
`logprobs`, `response_format`, forced tool choice); `temperature`, `top_p`, `top_k` and `min_p` are accepted and
ignored (the diffusion sampler's temperature schedule is `t_min`..`t_max`, which a request may set), as README
documents. The diffusion settings come as extra body fields (`steps`, `entropy_bound`, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..chat_template import ChatTemplateError
from .errors import RequestError
from .messages import normalize_messages, with_images

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
    ids, patches = with_images(ctx.vision, ids, images)
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
    ids, patches = with_images(ctx.vision, ids, images)
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
