"""The outputs of the forced tool choices, whose shape a grammar (the JSON schemas of
`frontend.tool_calling`) imposes: `required` writes a JSON array of `{"name", "parameters"}`
objects, a named function its arguments object alone."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser


class RequiredToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._attempt = []
        self._state = self._open

    def _open(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "[", then=self._array, otherwise=self._fail)

    def _array(self, text: str, pos: int) -> int:
        return self.array_of_calls(text, pos, then=self._rest_is_content, argument_keys=("parameters",))


class NamedToolParser(ToolParser):
    def __init__(self, name: str) -> None:
        super().__init__(max_calls=1)
        self.name = name
        self._attempt = []
        self._state = self._open

    def _open(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "{", then=self._call, otherwise=self._fail, consume=False)

    def _call(self, text: str, pos: int) -> int:
        return self.read_call(text, pos, then=self._rest_is_content, name=self.name)
