"""Chat messages as clients send them (OpenAI and Ollama) turned into what the chat template takes: text or
content parts, images collected in order (data: URLs, or Ollama's base64), tool calls with object arguments,
tool results named after the call they answer, an assistant turn's reasoning under `reasoning`."""

from __future__ import annotations

import base64
import binascii
import json

from .errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_PARTS = ("image_url", "image", "input_image")


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


def with_images(encoder, ids: list[int], images: list) -> tuple[list[int], list]:
    """Read the images (before anything runs: a bad one is a 400) and expand their placeholders to soft tokens."""
    if not images:
        return ids, []
    from ..vision import ImageError, expand_image_tokens

    try:
        patches = encoder.process(images)
        ids = expand_image_tokens(ids, [p.soft_tokens for p in patches], encoder.boi_token_id,
                                  encoder.image_token_id, encoder.eoi_token_id)
    except ImageError as e:
        raise RequestError(str(e), param="messages", code="invalid_image") from None
    return ids, patches
