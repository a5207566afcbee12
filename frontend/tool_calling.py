"""A chat request's tools: checked (a 400 naming what is wrong), and turned into what serving it
needs: the parser of its output and, for `required` and a named function, the JSON schema that
a grammar imposes on the output so that it always parses (vLLM's schemas).

`tool_choice` as OpenAI and vLLM: with tools it defaults to "auto", which needs the server's
`--enable-auto-tool-choice` and `--tool-call-parser`; "none" leaves the output text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from engine_core.protocol import StructuredOutputsParams
from frontend.errors import invalid_param
from frontend.openai_protocol import ChatCompletionRequest, ChatTool
from frontend.tool_parsers import TOOL_PARSERS, ToolParser
from frontend.tool_parsers.forced import NamedToolParser, RequiredToolParser

# OpenAI's rule for function names.
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_MAX_SCHEMA_DEPTH = 64  # deeper schemas are refused before any recursion can run out of stack
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCallingConfig:
    """The server's flags (vLLM's): whether "auto" is served, and by which parser."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a key of TOOL_PARSERS


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is served."""

    make_parser: Callable[[], ToolParser]  # one per choice
    structured_outputs: StructuredOutputsParams | None  # the grammar of required / named
    needs_special_tokens: bool  # the format's marker is a special token the text must keep


def plan_tool_calls(body: ChatCompletionRequest, config: ToolCallingConfig) -> ToolPlan | None:
    """None: the output is plain text (no tools, or tool_choice "none")."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none":
            raise invalid_param("tool_choice", "tool_choice needs tools: give the functions in `tools`")
        return None
    check_tools(body.tools)
    max_calls = None if body.parallel_tool_calls else 1
    if choice == "none":
        return None
    if choice == "auto":
        if not config.enable_auto_tool_choice or config.tool_call_parser is None:
            raise invalid_param("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                "--tool-call-parser to be set")
        parser = TOOL_PARSERS[config.tool_call_parser]
        return ToolPlan(lambda: parser(max_calls), None, parser.needs_special_tokens)
    if choice == "required":
        schema = required_schema(body.tools, max_calls)
        return ToolPlan(lambda: RequiredToolParser(max_calls), _json_constraint(schema), False)
    name = choice.function.name
    tool = next((tool for tool in body.tools if tool.function.name == name), None)
    if tool is None:
        known = ", ".join(repr(tool.function.name) for tool in body.tools)
        raise invalid_param("tool_choice.function.name", f"tool_choice names the function {name!r}, which is "
                            f"not among the tools ({known})")
    return ToolPlan(lambda: NamedToolParser(name),
                    _json_constraint(closed_objects(tool.function.parameters or _NO_PARAMETERS)), False)


def required_schema(tools: list[ChatTool], max_calls: int | None) -> dict[str, Any]:
    """A JSON array of calls, at least one, each `{"name": <a tool's name>, "parameters": <that
    tool's arguments>}` and no other key (else a small model pads calls with keys of its own
    until max_tokens cuts the array off). The tools' `$defs` move to the top, where their
    `$ref`s point."""
    defs: dict[str, Any] = {}
    calls = []
    for i, tool in enumerate(tools):
        parameters = closed_objects(tool.function.parameters or _NO_PARAMETERS)
        for key, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(key, definition) != definition:
                raise invalid_param(f"tools[{i}].function.parameters.$defs",
                                    f"tools define $defs.{key} differently; give their definitions distinct names")
        calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                                       "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if defs:
        schema["$defs"] = defs
    return schema


def check_tools(tools: list[ChatTool]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _FUNCTION_NAME.match(name):
            raise invalid_param(f"tools[{i}].function.name", f"function name {name!r} must be 1 to 64 letters, "
                                "digits, underscores or dashes")
        if name in seen:
            raise invalid_param(f"tools[{i}].function.name", f"two tools are named {name!r}; names must differ")
        seen.add(name)
        parameters = tool.function.parameters
        if parameters is not None:
            path = f"tools[{i}].function.parameters"
            if parameters.get("type", "object") != "object":
                raise invalid_param(path, f"{path} must be the JSON schema of an object (type \"object\"), got "
                                    f"type {parameters['type']!r}")
            check_schema(parameters, path, 0)


def check_schema(schema: Any, path: str, depth: int) -> None:
    """The structure of a JSON schema: what a grammar could not be built from is a 400."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise invalid_param(path, f"{path} must be a JSON schema (an object or a boolean), got {_shown(schema)}")
    if depth > _MAX_SCHEMA_DEPTH:
        raise invalid_param(path, f"{path} nests schemas deeper than {_MAX_SCHEMA_DEPTH} levels")
    types = schema.get("type")
    for type_ in types if isinstance(types, list) else [types]:
        if types is not None and type_ not in _JSON_TYPES:
            raise invalid_param(f"{path}.type", f"{path}.type: {_shown(type_)} is not a JSON Schema type (one "
                                f"of {', '.join(_JSON_TYPES)})")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise invalid_param(f"{path}.required", f"{path}.required must be a list of property names")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise invalid_param(f"{path}.enum", f"{path}.enum must be a non-empty list")
    for key in _SUBSCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise invalid_param(f"{path}.{key}", f"{path}.{key} must be a non-empty list of schemas")
            for j, sub in enumerate(schema[key]):
                check_schema(sub, f"{path}.{key}[{j}]", depth + 1)
    for key in _SUBSCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                raise invalid_param(f"{path}.{key}", f"{path}.{key} must be an object of schemas")
            for name, sub in schema[key].items():
                check_schema(sub, f"{path}.{key}.{name}", depth + 1)
    for key in _SUBSCHEMAS:
        if key in schema:
            check_schema(schema[key], f"{path}.{key}", depth + 1)


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which every object that does not say otherwise takes only
    its declared properties (`additionalProperties: false`, as OpenAI's strict mode requires).
    A forced call then carries the function's own arguments: a small model otherwise invents
    keys that the function would refuse."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def template_tools(tools: list[ChatTool] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them: OpenAI's JSON shape."""
    return None if tools is None else msgspec.to_builtins(tools)


def _json_constraint(schema: dict[str, Any]) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=json.dumps(schema))


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:100] + "..."
