"""The server's text pipeline without a model: Gemma 4 tool calls, the reasoning split, stop strings."""

import pytest

from mlx_dgemma.chat_template import gemma4_value
from mlx_dgemma.server.output import ChannelParser, StopMatcher, prompt_opens_reasoning
from mlx_dgemma.server.tool_calls import ToolCallSyntaxError, parse_call

Q = '<|"|>'


@pytest.mark.parametrize("text,name,args", [
    (f"call:get_weather{{city:{Q}Tokyo{Q},unit:{Q}celsius{Q}}}", "get_weather", {"city": "Tokyo", "unit": "celsius"}),
    (f"call:f{{s:{Q}a, {{b}}] c{Q}}}", "f", {"s": "a, {b}] c"}),
    ("call:f{i:3,x:-2.5,e:1e3,t:true,n:false,z:null}", "f", {"i": 3, "x": -2.5, "e": 1000.0, "t": True, "n": False,
                                                            "z": None}),
    (f"call:f{{o:{{a:{{b:[1,{Q}x{Q},[]]}}}},{Q}3{Q}:{{}}}}", "f", {"o": {"a": {"b": [1, "x", []]}}, "3": {}}),
    ("call:f{}", "f", {}),
    ("call:mcp.calendar:list-events{}", "mcp.calendar:list-events", {}),
    ("call:get_weather{city:Austin}", "get_weather", {"city": "Austin"}),  # unquoted string
    ("get_weather{city:Austin}", "get_weather", {"city": "Austin"}),  # no `call:`
])
def test_tool_call_arguments(text, name, args):
    assert parse_call(text) == (name, args)


@pytest.mark.parametrize("text", [f"call:f{{s:{Q}open}}", "call:f{a:1", "Like call: prince", "call:f{a 1}"])
def test_broken_tool_calls_raise(text):
    with pytest.raises(ToolCallSyntaxError):
        parse_call(text)


def test_values_written_back_parse_the_same():
    args = {"s": "a, {b}]", "n": 3, "f": 0.5, "b": True, "z": None, "l": [1, {"k": "v"}], "o": {}}
    assert parse_call("call:f" + gemma4_value(args)) == ("f", args)


def _run(pieces, in_reasoning=False):
    parser = ChannelParser(in_reasoning)
    content, reasoning, calls = "", "", []
    for i, piece in enumerate(pieces):
        d = parser.add(piece, final=i == len(pieces) - 1)
        content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
    return content, reasoning, calls, parser


def _every_split(text):
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:], ""]


@pytest.mark.parametrize("text,content,reasoning", [
    ("<|channel>thought\nR here<channel|>C here", "C here", "R here"),
    ("<|channel>thought\n<channel|>Only answer", "Only answer", ""),
    ("<|channel>thousand reasons<channel|>x", "x", "thousand reasons"),  # not the label
    ("<think>deep</think>shallow", "shallow", "deep"),
    ("plain text, thinking or not", "plain text, thinking or not", ""),
    ("<|channel>thought\nran out of budget", "", "ran out of budget"),
    ("answer<turn|>", "answer", ""),
])
def test_reasoning_split_at_every_boundary(text, content, reasoning):
    for pieces in _every_split(text):
        got = _run(pieces)
        assert (got[0], got[1]) == (content, reasoning), pieces
        assert "<|channel>" not in got[0] and "<channel|>" not in got[0]


def test_prompt_that_opened_the_channel():
    assert prompt_opens_reasoning("<|turn>model\n<|channel>thought\n")
    assert not prompt_opens_reasoning("<|turn>model\n<|channel>thought\n<channel|>")
    assert _run(["still thinking<channel|>done"], in_reasoning=True)[:2] == ("done", "still thinking")


def test_tool_calls_in_text():
    text = f"Let me look.<|tool_call>call:a{{x:1}}<tool_call|><|tool_call>call:b{{y:{Q}z{Q}}}<tool_call|>"
    for pieces in _every_split(text):
        content, _, calls, _ = _run(pieces)
        assert content == "Let me look." and calls == [("a", {"x": 1}), ("b", {"y": "z"})]
    content, reasoning, calls, parser = _run(["<|channel>thought\nhm<|tool_call>call:a{x:1}<tool_call|>"])
    assert (reasoning, calls) == ("hm", [("a", {"x": 1})])  # a call ends the reasoning
    content, _, calls, parser = _run(["ok <|tool_call>call:a{x:"])  # cut off: not a call, and no markup shown
    assert calls == [] and content == "ok " and parser.failed_calls


def test_stop_strings_across_pieces():
    for cut in range(1, 12):
        text = "hello STOP world"
        m = StopMatcher(["STOP", "never"])
        out = m.add(text[:cut]) + m.add(text[cut:])
        assert out == "hello " and m.stopped
    m = StopMatcher(["abc"])
    assert m.add("xab") == "x" and m.add("d", final=True) == "abd" and not m.stopped
