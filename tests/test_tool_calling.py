"""Tool calling end to end: the real OpenAI SDK against `octavo serve --enable-auto-tool-choice
--tool-call-parser hermes` on the default model, with our Hermes tool template (SmolLM2's own
template does not render tools).

`tool_choice="required"` and a named function hold only because a grammar constrains the
output (`structured_outputs`): without grammar-constrained decoding in the engine, the
135M model answers in prose and those tests fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from frontend.cli import TOOL_CHAT_TEMPLATE_HERMES
from tests.test_server import MODEL, ServerProcess, engine_is_gone, request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPTS = [ASK, [{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Tell me a joke."}]]


def past_call(call_id: str, city: str) -> dict[str, Any]:
    function = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": function}]}


# Two earlier turns in which the assistant called get_weather: enough for the 135M model to call
# it for Paris on its own, in the Hermes format.
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in London?"}, past_call("call_1", "London"),
    {"role": "tool", "tool_call_id": "call_1", "content": "10 C, rain"},
    {"role": "assistant", "content": "It is 10 C and raining in London."},
    {"role": "user", "content": "What is the weather in Rome?"}, past_call("call_2", "Rome"),
    {"role": "tool", "tool_call_id": "call_2", "content": "25 C, sunny"},
    {"role": "assistant", "content": "It is 25 C and sunny in Rome."},
    *ASK,
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", "1024", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         "--chat-template", TOOL_CHAT_TEMPLATE_HERMES)
    yield proc
    engine_pid = proc.engine_pid
    assert proc.stop() == 0, proc.log_text()
    assert engine_is_gone(engine_pid)
    proc.remove_log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """(content, calls, finish_reason) of a streamed completion, assembled as a client does,
    checking OpenAI's delta shapes: a call's first delta carries its id, type and name, later
    ones only its index and argument fragments."""
    content, calls, finish_reason = [], [], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            if call.index == len(calls):
                assert call.id and call.id.startswith("call_") and call.type == "function" and call.function.name
                calls.append({"id": call.id, "name": call.function.name, "arguments": call.function.arguments or ""})
            else:
                assert call.index == len(calls) - 1 and call.id is None and call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments
        finish_reason = choice.finish_reason or finish_reason
    return "".join(content) or None, calls, finish_reason


def check_arguments(name: str, arguments: str) -> None:
    """The arguments are the declared function's: a JSON object of its properties, with the
    required ones, of the declared types."""
    values = json.loads(arguments)
    if name == "get_weather":
        assert set(values) == {"city"} and isinstance(values["city"], str)
    else:
        assert name == "add" and set(values) == {"a", "b"}
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in values.values())


def test_auto_parses_the_models_hermes_call(client):
    response = client.chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=[WEATHER], temperature=0,
                                              max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    content, calls, finish_reason = streamed(client, messages=FEW_SHOT, tools=[WEATHER], temperature=0,
                                             max_tokens=60)
    assert (content, finish_reason) == (None, "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_auto_without_a_call_is_text(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=30)
    choice = response.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_none_never_returns_tool_calls(client):
    # The prompt that makes the model call get_weather under "auto": the call stays text.
    response = client.chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=[WEATHER], tool_choice="none",
                                              temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert not choice.message.tool_calls and "<tool_call>" in choice.message.content
    assert choice.finish_reason == "stop"
    content, calls, finish_reason = streamed(client, messages=FEW_SHOT, tools=[WEATHER], tool_choice="none",
                                             temperature=0, max_tokens=60)
    assert (content, calls, finish_reason) == (choice.message.content, [], "stop")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "sampled"])
def test_required_always_parses_into_a_declared_function(client, sampling):
    for messages in PROMPTS:
        response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                                  max_tokens=80, **sampling)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message.content
        for call in choice.message.tool_calls:
            check_arguments(call.function.name, call.function.arguments)
        content, calls, finish_reason = streamed(client, messages=messages, tools=TOOLS, tool_choice="required",
                                                 max_tokens=80, **sampling)
        assert finish_reason == "tool_calls" and calls, content
        for call in calls:
            check_arguments(call["name"], call["arguments"])


def test_required_without_parallel_calls_makes_one(client):
    response = client.chat.completions.create(model=MODEL, messages=PROMPTS[1], tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=80)
    assert len(response.choices[0].message.tool_calls) == 1


def test_named_function_returns_that_function(client):
    for name in ("get_weather", "add"):
        choice = {"type": "function", "function": {"name": name}}
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  temperature=0, max_tokens=100)
        [call] = response.choices[0].message.tool_calls
        assert call.function.name == name
        check_arguments(name, call.function.arguments)
        _, calls, _ = streamed(client, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=100)
        assert [c["name"] for c in calls] == [name]
        check_arguments(name, calls[0]["arguments"])


def test_tool_messages_go_back_into_the_template(server, client):
    messages = [*ASK, past_call("call_9", "Paris"),
                {"role": "tool", "tool_call_id": "call_9", "content": "18 C, sunny"}]
    status, body = request(server, "POST", "/tokenize", {"messages": messages})
    assert status == 200, body
    _, text = request(server, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text["prompt"])
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text["prompt"]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=20)
    assert response.choices[0].message.content and response.usage.completion_tokens > 0


@pytest.mark.parametrize("fields,param,says", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice.function.name",
     "'get_time'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name", "'get weather'"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strng"}}}}}]},
     "tools[0].function.parameters.properties.x.type", '"strng"'),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "tools"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "JSON"),
    # Hostile sizes and types.
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "<= 128"),
    ({"tools": "get_weather"}, "tools", "array"),
    ({"tool_choice": "sometimes"}, "tool_choice", "sometimes"),
])
def test_bad_tools_get_400_naming_the_problem(server, fields, param, says):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 5, **fields}
    status, response = request(server, "POST", "/v1/chat/completions", {k: v for k, v in body.items() if v is not None})
    assert status == 400, response
    assert response["error"]["param"] == param and says in response["error"]["message"]
