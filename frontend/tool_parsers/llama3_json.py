"""Llama 3.1 / 3.2 / 3.3 JSON calls: the output is `{"name": ..., "parameters": {...}}`, maybe
after `<|python_tag|>`, several separated by `;`. An output that starts otherwise is all content."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._state = self._start

    def _start(self, text: str, pos: int) -> int:
        start = pos
        while pos < len(text) and text[pos].isspace():
            pos += 1
        rest = text[pos:pos + len(PYTHON_TAG)]
        if not rest or (len(rest) < len(PYTHON_TAG) and PYTHON_TAG.startswith(rest)):
            self._hold(text[start:], is_content=True)  # not decided yet
            return len(text)
        self._attempt = [text[start:pos]]
        if rest == PYTHON_TAG:
            self._attempt.append(PYTHON_TAG)
            self._state = self._object
            return pos + len(PYTHON_TAG)
        if text[pos] == "{":
            self._state = self._call
            return pos
        self._attempt = None
        self._state = self._rest_is_content
        return start

    def _object(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "{", then=self._call, otherwise=self._fail, consume=False)

    def _call(self, text: str, pos: int) -> int:
        return self.read_call(text, pos, then=self._separator)

    def _separator(self, text: str, pos: int) -> int:
        return self.expect(text, pos, ";", then=self._object, otherwise=self._rest_is_content)
