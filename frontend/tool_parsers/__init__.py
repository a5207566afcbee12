"""Tool-call parsers: from a model's output text to OpenAI `tool_calls`, streamed or whole.
`--tool-call-parser` picks the format of `tool_choice="auto"`; `forced` reads the outputs of
`required` and named choices."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser
from frontend.tool_parsers.hermes import HermesToolParser
from frontend.tool_parsers.llama3_json import Llama3JsonToolParser
from frontend.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
