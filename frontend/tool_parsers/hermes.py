"""Hermes-style calls, as the Qwen2.5 / Qwen3 / SmolLM2 chat templates ask for them:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them, text around
them. A `<tool_call>` may also hold a JSON array of such objects (SmolLM2 writes that)."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._state = self._text

    def _text(self, text: str, pos: int) -> int:
        return self.content_until(text, pos, OPEN, then=self._open)

    def _open(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "{", then=self._call, otherwise=self._open_array, consume=False)

    def _open_array(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "[", then=self._array, otherwise=self._fail)

    def _array(self, text: str, pos: int) -> int:
        return self.array_of_calls(text, pos, then=self._close)

    def _call(self, text: str, pos: int) -> int:
        return self.read_call(text, pos, then=self._close)

    def _close(self, text: str, pos: int) -> int:
        # A model that forgets the closing tag has still made its call.
        return self.expect(text, pos, CLOSE, then=self._text, otherwise=self._text)
