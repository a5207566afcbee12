"""Mistral calls: `[TOOL_CALLS]` (a special token), then a JSON array of
`{"name": ..., "arguments": {...}}` objects; text before it is content."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser

TOOL_CALLS = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    needs_special_tokens = True

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._state = self._text

    def _text(self, text: str, pos: int) -> int:
        return self.content_until(text, pos, TOOL_CALLS, then=self._open)

    def _open(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "[", then=self._array, otherwise=self._fail)

    def _array(self, text: str, pos: int) -> int:
        return self.array_of_calls(text, pos, then=self._rest_is_content)
