"""Chat templates: the built-in Gemma 4 text template and a sandboxed, HF-compatible jinja2 environment.

Gemma 4 chat format (what the built-in template writes when a folder ships none):

    <bos><|turn>system\\n[<|think|>\\n]{system}<turn|>\\n<|turn>user\\n{msg}<turn|>\\n<|turn>model\\n

The system turn is written when there is a system message, thinking is on or tools are given (declared there as
`<|tool>declaration:NAME{...}<tool|>`). An assistant turn's tool calls are written `<|tool_call>call:NAME{...}<tool_call|>`
and the tool results that follow go into the same model turn as `<|tool_response>response:NAME{...}<tool_response|>`;
the model then continues that turn (no new generation prompt). Previous model turns are re-rendered
with their reasoning (`<|channel>thought\\n ... <channel|>`) removed. With thinking off the generation prompt ends
with the empty thought channel `<|channel>thought\\n<channel|>`; with thinking on it ends at `<|turn>model\\n`.
"""

from __future__ import annotations

import json
from datetime import datetime

__all__ = ["BUILTIN_CHAT_TEMPLATE", "ChatTemplateError", "compile_template"]

# Our own Gemma 4 text chat template (used only when the folder ships no template). Plain jinja, so it can also be
# written out as a `chat_template.jinja`.
BUILTIN_CHAT_TEMPLATE = r"""{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- macro render_content(content, strip_thinking) -%}
{%- if content is string -%}
{%- set text = content -%}
{%- elif content is none -%}
{%- set text = '' -%}
{%- else -%}
{%- set ns = namespace(text='') -%}
{%- for part in content -%}
{%- if part is string -%}
{%- set ns.text = ns.text + part -%}
{%- elif part['type'] == 'text' -%}
{%- set ns.text = ns.text + part['text'] -%}
{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}
{%- set ns.text = ns.text + '<|image|>' -%}
{%- elif part['type'] == 'audio' -%}
{%- set ns.text = ns.text + '<|audio|>' -%}
{%- elif part['type'] == 'video' -%}
{%- set ns.text = ns.text + '<|video|>' -%}
{%- else -%}
{{- raise_exception('Unsupported content part type: ' ~ part['type']) -}}
{%- endif -%}
{%- endfor -%}
{%- set text = ns.text -%}
{%- endif -%}
{%- if strip_thinking -%}
{%- set ns2 = namespace(out='', rest=text) -%}
{%- for _ in range(text.count('<|channel>')) -%}
{%- set head = ns2.rest.split('<|channel>', 1) -%}
{%- set ns2.out = ns2.out + head[0] -%}
{%- if '<channel|>' in head[1] -%}
{%- set ns2.rest = head[1].split('<channel|>', 1)[1] -%}
{%- else -%}
{%- set ns2.rest = '' -%}
{%- endif -%}
{%- endfor -%}
{%- set text = ns2.out + ns2.rest -%}
{%- endif -%}
{{- text | trim -}}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- set system_message = render_content(messages[0]['content'], false) -%}
{%- set rest = messages[1:] -%}
{%- set has_system = true -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set rest = messages -%}
{%- set has_system = false -%}
{%- endif -%}
{%- if has_system or thinking or tools -%}
{{- '<|turn>system\n' -}}
{%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{{- system_message -}}
{%- for tool in tools or [] -%}
{%- set fn = tool['function'] if tool['function'] is defined else tool -%}
{{- '<|tool>declaration:' + fn['name'] + (fn | gemma4_declaration) + '<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- set turn = namespace(open=false) -%}
{%- for message in rest -%}
{%- if message['role'] == 'user' -%}
{%- if turn.open -%}{{- '<turn|>\n' -}}{%- set turn.open = false -%}{%- endif -%}
{{- '<|turn>user\n' + render_content(message['content'], false) + '<turn|>\n' -}}
{%- elif message['role'] in ['assistant', 'model'] -%}
{%- if not turn.open -%}{{- '<|turn>model\n' -}}{%- endif -%}
{{- render_content(message['content'], true) -}}
{%- for call in message['tool_calls'] or [] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{{- '<|tool_call>call:' + fn['name'] + (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | gemma4_value) + '<tool_call|>' -}}
{%- endfor -%}
{%- if message['tool_calls'] -%}{%- set turn.open = true -%}{%- else -%}{{- '<turn|>\n' -}}{%- set turn.open = false -%}{%- endif -%}
{%- elif message['role'] == 'tool' -%}
{%- if not turn.open -%}{{- '<|turn>model\n' -}}{%- set turn.open = true -%}{%- endif -%}
{{- '<|tool_response>response:' + (message['name'] or 'tool') + (message['content'] | gemma4_response) + '<tool_response|>' -}}
{%- elif message['role'] in ['system', 'developer'] -%}
{{- raise_exception('A system message is only supported as the first message.') -}}
{%- else -%}
{{- raise_exception('Unsupported message role: ' ~ message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not turn.open -%}
{{- '<|turn>model\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""



class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render (including its own `raise_exception`)."""



# --------------------------------------------------------------------------------------------------------------------
# Chat template rendering (jinja2, sandboxed, HF-compatible environment)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like HF's: no ASCII escaping, and no HTML-safe escaping (unlike jinja2's built-in tojson).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


QUOTE = '<|"|>'


def gemma4_value(value) -> str:
    """A JSON-like value in Gemma 4's argument syntax: bare keys, `<|"|>`-quoted strings, bare numbers/booleans/null."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{gemma4_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(gemma4_value(v) for v in value) + "]"
    return QUOTE + str(value) + QUOTE


def _upper_types(schema):
    """JSON-schema `type` names as Gemma 4 declarations write them (STRING, OBJECT, ...)."""
    if isinstance(schema, dict):
        return {k: (v.upper() if k == "type" and isinstance(v, str) else _upper_types(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_upper_types(v) for v in schema]
    return schema


def _declaration(function) -> str:
    fields = {k: function[k] for k in ("description", "parameters") if function.get(k) is not None}
    return gemma4_value(_upper_types(fields))


def _tool_response(content) -> str:
    """A tool's result: an object as itself, anything else under `value`."""
    if isinstance(content, str):
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return gemma4_value(parsed)
    return gemma4_value(content if isinstance(content, dict) else {"value": content})


def _jinja_environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.filters["gemma4_value"] = gemma4_value
    env.filters["gemma4_declaration"] = _declaration
    env.filters["gemma4_response"] = _tool_response
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def compile_template(source: str, origin: str):
    import jinja2

    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template syntax error (template line {e.lineno}): {e.message}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{origin}: invalid chat template: {e}") from e

