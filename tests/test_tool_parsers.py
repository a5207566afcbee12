"""The tool-call parsers on fixed outputs of each format, whole and streamed in pieces of every
size, and the request-side rules of tool calling (schemas, 400s) that need no server."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from frontend.errors import APIError
from frontend.openai_protocol import ChatCompletionRequest
from frontend.tool_calling import ToolCallingConfig, closed_objects, plan_tool_calls, required_schema
from frontend.tool_parsers import TOOL_PARSERS, ToolParser
from frontend.tool_parsers.forced import NamedToolParser, RequiredToolParser

WEATHER_ARGS = {"city": "Paris, \"FR\"", "days": [1, 2], "unit": {"name": "celsius", "note": "a } and a ]"}}
TIME_ARGS = {"zone": "CET"}


def hermes_call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


HERMES_TWO = ("Let me look that up.\n" + hermes_call("get_weather", WEATHER_ARGS) + "\n"
              + hermes_call("get_time", TIME_ARGS))
LLAMA_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": ' + json.dumps(WEATHER_ARGS) + '}; '
             '{"name": "get_time", "parameters": ' + json.dumps(TIME_ARGS) + '}')
MISTRAL_TWO = ('Looking. [TOOL_CALLS] [{"name": "get_weather", "arguments": ' + json.dumps(WEATHER_ARGS) + '}, '
               '{"name": "get_time", "arguments": ' + json.dumps(TIME_ARGS) + '}]')
REQUIRED_TWO = ('[{"name": "get_weather", "parameters": ' + json.dumps(WEATHER_ARGS) + '}, '
                '{"name": "get_time", "parameters": ' + json.dumps(TIME_ARGS) + '}]')

TWO_CALLS = [  # (parser factory, output, the content outside the calls)
    (TOOL_PARSERS["hermes"], HERMES_TWO, "Let me look that up."),
    (TOOL_PARSERS["llama3_json"], LLAMA_TWO, None),
    (TOOL_PARSERS["mistral"], MISTRAL_TWO, "Looking."),
    (RequiredToolParser, REQUIRED_TWO, None),
]


def stream(parser: ToolParser, text: str, pieces: list[int]) -> tuple[str, list[dict]]:
    """Feed `text` cut at `pieces`; return the content and the calls as a client assembles them,
    checking that every delta has OpenAI's shape on the way."""
    content, calls = [], []
    cuts = [0, *pieces, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(cuts, cuts[1:])] + [parser.finish()]
    for delta in deltas:
        content.append(delta.content)
        for call in delta.calls:
            if call.index == len(calls):  # a call's first delta: id, name, and maybe arguments
                assert call.id is not None and call.id.startswith("call_") and call.name
                calls.append({"id": call.id, "name": call.name, "arguments": call.arguments})
            else:
                assert call.index == len(calls) - 1, "deltas of one call at a time, in order"
                assert call.id is None and call.name is None and call.arguments
                calls[call.index]["arguments"] += call.arguments
    return "".join(content), calls


def cuts(text: str, rng: random.Random) -> list[list[int]]:
    """Ways to cut a text: into characters, into random pieces of 1 to 8, whole."""
    random_cuts, at = [], 0
    while (at := at + rng.randint(1, 8)) < len(text):
        random_cuts.append(at)
    return [list(range(1, len(text))), random_cuts, []]


@pytest.mark.parametrize("make_parser,text,content", TWO_CALLS, ids=["hermes", "llama3_json", "mistral", "required"])
def test_two_parallel_calls_whole_and_streamed(make_parser, text, content):
    parsed = make_parser().parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", WEATHER_ARGS),
                                                                         ("get_time", TIME_ARGS)]
    assert len({c.id for c in parsed.calls}) == 2
    for pieces in cuts(text, random.Random(0)):
        streamed_content, calls = stream(make_parser(), text, pieces)
        assert streamed_content == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", WEATHER_ARGS),
                                                                            ("get_time", TIME_ARGS)]


@pytest.mark.parametrize("make_parser,text,content", TWO_CALLS, ids=["hermes", "llama3_json", "mistral", "required"])
def test_parallel_tool_calls_false_keeps_the_first_call(make_parser, text, content):
    parsed = make_parser(max_calls=1).parse(text)
    assert [c.name for c in parsed.calls] == ["get_weather"]
    assert [c["name"] for c in stream(make_parser(max_calls=1), text, list(range(1, len(text))))[1]] == ["get_weather"]


@pytest.mark.parametrize("text", [
    "Just an answer, no call.",
    "Plain text that ends in half a marker <tool_",
    'A call cut before its name <tool_call>\n{"name": "get_wea',
    'Malformed JSON <tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call> and after.',
    'Not a call object <tool_call>\n{"answer": 42}\n</tool_call>',
    'A marker and no JSON <tool_call> sorry </tool_call>',
])
def test_hermes_text_that_is_no_call_stays_content(text):
    parsed = TOOL_PARSERS["hermes"]().parse(text)
    assert (parsed.content, parsed.calls) == (text, [])
    for pieces in cuts(text, random.Random(1)):
        assert stream(TOOL_PARSERS["hermes"](), text, pieces) == (text, [])


def test_hermes_call_cut_short_is_content_whole_but_streams_what_came():
    # A stream cannot take back the deltas it sent: a call cut off (max_tokens) stays a call
    # with partial arguments there, as with OpenAI; the whole response gives it back as text.
    text = 'Cut off <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    parsed = TOOL_PARSERS["hermes"]().parse(text)
    assert (parsed.content, parsed.calls) == (text, [])
    content, calls = stream(TOOL_PARSERS["hermes"](), text, list(range(1, len(text))))
    assert content == "Cut off" and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Par')]


def test_hermes_call_without_closing_tag_and_text_after_a_call():
    text = 'Sure.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}'
    parsed = TOOL_PARSERS["hermes"]().parse(text)
    assert parsed.content == "Sure."
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_time", '{"zone": "UTC"}')]
    text = hermes_call("get_time", TIME_ARGS) + "\nDone."
    parsed = TOOL_PARSERS["hermes"]().parse(text)
    assert parsed.content == "Done." and [c.name for c in parsed.calls] == ["get_time"]


def test_hermes_array_inside_a_tool_call_as_smollm2_writes_it():
    text = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
            '{"name": "get_time", "arguments": {}}]</tool_call>')
    assert [(c.name, c.arguments) for c in TOOL_PARSERS["hermes"]().parse(text).calls] == [
        ("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]


def test_llama3_output_not_starting_with_a_call_is_content():
    for text in ['The JSON is {"name": "get_time", "parameters": {}}', '{"answer": 42}', "  plain"]:
        parsed = TOOL_PARSERS["llama3_json"]().parse(text)
        assert (parsed.content, parsed.calls) == (text, [])
        assert stream(TOOL_PARSERS["llama3_json"](), text, list(range(1, len(text)))) == (text, [])
    parsed = TOOL_PARSERS["llama3_json"]().parse('{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_time", '{"zone": "UTC"}')]


def test_mistral_malformed_array_is_content():
    text = 'Hm [TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": }}]'
    assert TOOL_PARSERS["mistral"]().parse(text).content == text
    assert TOOL_PARSERS["mistral"].needs_special_tokens  # [TOOL_CALLS] must survive detokenization


def test_named_choice_reads_the_bare_arguments_object():
    text = ' {"city": "Lima", "days": [3]} '
    parsed = NamedToolParser("get_weather").parse(text)
    assert (parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]) == (
        None, [("get_weather", {"city": "Lima", "days": [3]})])
    content, calls = stream(NamedToolParser("get_weather"), text, list(range(1, len(text))))
    assert content == "" and [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Lima", "days": [3]})]
    assert NamedToolParser("get_weather").parse("no JSON here").calls == []


def test_a_long_call_streamed_token_by_token_holds_back_only_a_marker():
    # The parser reads each new piece once and keeps back at most a marker's length, so a long
    # output costs time in proportion to its length.
    arguments = {"text": "word " * 4000}
    text = "x" * 5000 + hermes_call("echo", arguments) + "y" * 5000
    parser = TOOL_PARSERS["hermes"]()
    content, calls = [], []
    for char in text:
        delta = parser.feed(char)
        assert len(parser._held) < len("</tool_call>")
        content.append(delta.content)
        calls += delta.calls
    content.append(parser.finish().content)
    assert "".join(content) == "x" * 5000 + "y" * 5000
    assert json.loads("".join(call.arguments for call in calls)) == arguments


# ---------------------------------------------------------------- request rules


def request(**fields) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
AUTO = ToolCallingConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")


def test_auto_tool_choice_needs_the_server_flag():
    for body in [request(tools=[TOOL]), request(tools=[TOOL], tool_choice="auto")]:
        with pytest.raises(APIError) as e:
            plan_tool_calls(body, ToolCallingConfig())
        assert e.value.status == 400 and "--enable-auto-tool-choice" in e.value.info.message
        assert plan_tool_calls(body, AUTO).structured_outputs is None
    assert plan_tool_calls(request(tools=[TOOL], tool_choice="none"), ToolCallingConfig()) is None
    assert plan_tool_calls(request(), ToolCallingConfig()) is None


def test_forced_choices_constrain_the_output_with_a_json_schema():
    required = plan_tool_calls(request(tools=[TOOL], tool_choice="required"), ToolCallingConfig())
    schema = json.loads(required.structured_outputs.json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    call = schema["items"]["anyOf"][0]
    assert call["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    # Objects take only their declared properties.
    assert call["properties"]["parameters"] == {**TOOL["function"]["parameters"], "additionalProperties": False}
    assert call["required"] == ["name", "parameters"] and call["additionalProperties"] is False
    single = plan_tool_calls(request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False), AUTO)
    assert json.loads(single.structured_outputs.json)["maxItems"] == 1
    named_choice = {"type": "function", "function": {"name": "get_weather"}}
    named = plan_tool_calls(request(tools=[TOOL], tool_choice=named_choice), ToolCallingConfig())
    assert json.loads(named.structured_outputs.json) == {**TOOL["function"]["parameters"], "additionalProperties": False}


def test_forced_schemas_close_objects_unless_the_schema_says_otherwise():
    schema = {"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "open": {"type": "object", "properties": {}, "additionalProperties": True},
        "items": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string"}}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["items"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy: the request's tools are left as sent


def test_required_schema_lifts_the_tools_defs_to_the_top():
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    schema = required_schema(request(tools=[tool]).tools, None)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
