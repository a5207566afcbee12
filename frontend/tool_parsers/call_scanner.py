"""An incremental reader of one tool call's JSON object, fed the model's text as it streams.

It consumes each character once (a regex jumps from one structural character to the next), so
a call of any length costs time in proportion to its length, not to its length squared as
re-parsing the whole text at every token would. As it reads, it reports the function's name
once its value is complete and the arguments' JSON text in fragments; when the object closes it
checks the whole object with `json.loads`, once.
"""

from __future__ import annotations

import json
import re

# Outside strings, only these characters change the structure; inside, only these end or escape.
_STRUCTURAL = re.compile(r'[{}\[\]",:]')
_IN_STRING = re.compile(r'["\\]')
WHITESPACE = " \t\n\r"  # JSON's


class CallScanner:
    """Reads one `{"name": ..., "arguments": {...}}` object (`argument_keys`: the format's names
    for "arguments") starting at its `{`. With `bare_arguments`, the object is the arguments themselves, of the
    function `name` (a named tool_choice)."""

    def __init__(self, argument_keys: tuple[str, ...], bare_arguments: str | None = None) -> None:
        self.argument_keys = argument_keys
        self.bare = bare_arguments is not None
        self.name: str | None = bare_arguments
        self.done = False
        self.valid = False
        self._raw: list[str] = []  # the object's text so far
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the last character read was a backslash inside a string
        self._expect_key = False
        self._key: str | None = None  # the depth-1 key whose value is being read
        # The one span of text being gathered: a depth-1 key, the name's value, or the arguments'.
        self._span: str | None = None  # "key", "name" or "args"
        self._span_parts: list[str] = []
        self._args_started = False  # the arguments' leading whitespace is behind us
        self._held_whitespace = ""  # the arguments' trailing whitespace, sent only if more follows
        self._fragments: list[str] = []

    def feed(self, text: str) -> tuple[int, str]:
        """Read `text` up to the end of the object; return how much of it was read and the
        arguments' text that arrived in it."""
        pos, end, span_from = 0, len(text), 0
        while pos < end and not self.done:
            if self._escaped:
                self._escaped = False
                pos += 1
                continue
            if self._in_string:
                found = _IN_STRING.search(text, pos)
                if found is None:
                    pos = end
                    break
                pos = found.end()
                if found.group() == "\\":
                    self._escaped = True
                else:
                    self._in_string = False
                    if self._span == "key":
                        self._key = _json_string(self._close_span(text, span_from, pos))
                continue
            found = _STRUCTURAL.search(text, pos)
            if found is None:
                pos = end
                break
            char, at, pos = found.group(), found.start(), found.end()
            if char == '"':
                self._in_string = True
                if self._depth == 1 and self._expect_key and not self.bare:
                    self._span, span_from, self._span_parts = "key", at, []
            elif char in "{[":
                self._depth += 1
                if self._depth == 1:
                    self._expect_key = True
                    if self.bare:
                        self._span, span_from = "args", at
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    if self.bare:
                        self._add_arguments(text[span_from:pos])
                        self._span = None
                    else:
                        self._end_value(text, span_from, at)
                    self.done = True
            elif self._depth == 1 and not self.bare:
                if char == ":":
                    self._begin_value()
                    span_from = pos
                elif char == ",":
                    self._end_value(text, span_from, at)
        if self._span == "args":
            self._add_arguments(text[span_from:pos])
        elif self._span is not None:
            self._span_parts.append(text[span_from:pos])
        self._raw.append(text[:pos])
        if self.done:
            self._check()
        fragment = "".join(self._fragments)
        self._fragments.clear()
        return pos, fragment

    def _begin_value(self) -> None:
        self._expect_key = False
        if self._key == "name":
            self._span, self._span_parts = "name", []
        elif self._key in self.argument_keys:
            self._span = "args"

    def _end_value(self, text: str, span_from: int, at: int) -> None:
        """A depth-1 value ended at `at` (a `,` or the closing `}`)."""
        if self._span == "name":
            self.name = _json_string(self._close_span(text, span_from, at))
        elif self._span == "args":
            self._add_arguments(text[span_from:at])
            self._span = None
        self._expect_key = True
        self._key = None

    def _close_span(self, text: str, span_from: int, upto: int) -> str:
        self._span_parts.append(text[span_from:upto])
        self._span = None
        return "".join(self._span_parts)

    def _add_arguments(self, piece: str) -> None:
        # Whitespace around the value is not part of it; whitespace inside goes out once
        # something follows it.
        if not self._args_started:
            piece = piece.lstrip(WHITESPACE)
            self._args_started = bool(piece)
        stripped = piece.rstrip(WHITESPACE)
        if stripped:
            self._fragments.append(self._held_whitespace + stripped)
            self._held_whitespace = ""
        self._held_whitespace += piece[len(stripped):]

    def _check(self) -> None:
        """The object as a whole: valid JSON of the expected shape."""
        try:
            value = json.loads("".join(self._raw))
        except ValueError:
            return
        if self.bare:
            self.valid = isinstance(value, dict)
        else:
            arguments = [value[key] for key in self.argument_keys if key in value] if isinstance(value, dict) else []
            # Exactly one arguments object: an object without one is some other JSON, not a call.
            self.valid = (isinstance(value, dict) and isinstance(value.get("name"), str)
                          and len(arguments) == 1 and isinstance(arguments[0], dict))
            if self.valid:
                self.name = value["name"]

    @property
    def raw(self) -> str:
        """The text read so far (for giving it back as content when it is not a call)."""
        return "".join(self._raw)


def _json_string(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
