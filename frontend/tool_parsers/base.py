"""What every tool-call parser shares: the output of one choice is fed in as it streams, and each
feed returns the content (text outside the calls) and tool-call deltas that arrived with it.

A format is a small state machine over the text: each state is a method `(text, pos) -> pos`
that reads from `pos` and sets the next state. What a state cannot decide yet (a marker cut in
half by a token boundary) it holds back, and the next feed starts with it; what it holds is at
most a marker long, so every character is read a bounded number of times.

A non-streaming response feeds the whole text at once (`parse`), so both see the same calls.
Text that turns out not to be a call (malformed JSON, a marker and nothing after it) goes back
to being content: the whole of it when not streaming; when streaming, only what was not already
sent as a call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from frontend.tool_parsers.call_scanner import WHITESPACE, CallScanner

State = Callable[[str, int], int]
ARGUMENT_KEYS = ("arguments", "parameters")  # what formats call a call's arguments


@dataclass
class ToolCallDelta:
    """A piece of one call: its first piece names it (id, name), later ones only add arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ToolCall]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser:
    """The parser of one choice's output. Subclasses set `_state` to their first state."""

    # Whether the format's marker is a special token, which the detokenizer must then keep.
    needs_special_tokens = False

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls  # parallel_tool_calls=false: 1; later calls are dropped
        self.num_calls = 0
        self.failed = False  # some text looked like a call and was not one
        self._state: State = self._rest_is_content
        self._held = ""
        self._held_is_content = False
        self._content: list[str] = []
        self._calls: list[ToolCallDelta] = []
        self._content_whitespace = ""  # trailing whitespace of the content, sent only if more follows
        self._after_call = False  # whitespace right after a call is not content either
        # The text of a call region that has produced no call yet, given back if none comes.
        self._attempt: list[str] | None = None
        self._scanner: CallScanner | None = None
        self._call_id = ""
        self._header_sent = False
        self._unsent_arguments: list[str] = []
        self._after_array: State = self._rest_is_content  # an array of calls: what follows its `]`
        self._argument_keys = ARGUMENT_KEYS  # an array of calls: its calls' arguments key

    # ------------------------------------------------------------ driving

    def feed(self, text: str) -> ParsedDelta:
        text, self._held = self._held + text, ""
        pos = 0
        while pos < len(text):
            pos = self._state(text, pos)
        return self._take()

    def finish(self) -> ParsedDelta:
        """The output ended: decide what was held back."""
        held, self._held = self._held, ""
        if self._scanner is not None or self._attempt is not None:
            self._give_back(held)  # a call that never finished
        elif self._held_is_content:
            self._emit_content(held)
        return self._take()

    def parse(self, text: str) -> ParsedOutput:
        """A whole output at once; when any of it is not a well-formed call, all of it is content."""
        deltas = [self.feed(text), self.finish()]
        if self.failed:
            return ParsedOutput(text, [])
        calls: list[ToolCall] = []
        for delta in (d for parsed in deltas for d in parsed.calls):
            if delta.id is not None:
                calls.append(ToolCall(delta.id, delta.name or "", delta.arguments))
            else:
                calls[delta.index].arguments += delta.arguments
        content = "".join(parsed.content for parsed in deltas)
        return ParsedOutput(content if content.strip() else None, calls)

    def _take(self) -> ParsedDelta:
        out = ParsedDelta("".join(self._content), self._calls)
        self._content, self._calls = [], []
        return out

    # ------------------------------------------------------------ states the formats share

    def _rest_is_content(self, text: str, pos: int) -> int:
        self._emit_content(text[pos:])
        return len(text)

    def _ignore_rest(self, text: str, pos: int) -> int:
        return len(text)

    def content_until(self, text: str, pos: int, marker: str, then: State) -> int:
        """Content up to `marker`; after it, a call region in state `then`."""
        found = text.find(marker, pos)
        if found >= 0:
            self._emit_content(text[pos:found])
            # The whitespace before a call is not content, unless the call turns out not to be one.
            self._attempt = [self._content_whitespace, marker]
            self._content_whitespace = ""
            self._state = then
            return found + len(marker)
        keep = _partial_marker(text, pos, marker)
        self._emit_content(text[pos:len(text) - keep])
        self._hold(text[len(text) - keep:], is_content=True)
        return len(text)

    def expect(self, text: str, pos: int, literal: str, then: State, otherwise: State,
               consume: bool = True) -> int:
        """After any whitespace, `literal` leads to `then` (which still sees it unless `consume`),
        anything else to `otherwise`."""
        start = pos
        while pos < len(text) and text[pos] in WHITESPACE:
            pos += 1
        if self._attempt is not None:
            self._attempt.append(text[start:pos])
        rest = text[pos:pos + len(literal)]
        if len(rest) < len(literal) and literal.startswith(rest):
            self._hold(text[pos:], is_content=False)
            return len(text)
        if rest != literal:
            self._state = otherwise
            return pos
        self._state = then
        if not consume:
            return pos
        if self._attempt is not None:
            self._attempt.append(literal)
        return pos + len(literal)

    def read_call(self, text: str, pos: int, then: State, argument_keys: tuple[str, ...] = ARGUMENT_KEYS,
                  name: str | None = None) -> int:
        """One call's JSON object, from its `{`; `name`: the object is the arguments of that function."""
        if self._scanner is None:
            if self.max_calls is not None and self.num_calls >= self.max_calls:
                self._attempt, self._state = None, self._ignore_rest
                return pos
            self._scanner = CallScanner(argument_keys=argument_keys, bare_arguments=name)
            self._call_id, self._header_sent, self._unsent_arguments = new_tool_call_id(), False, []
        scanner = self._scanner
        used, arguments = scanner.feed(text[pos:] if pos else text)
        pos += used
        if scanner.done and not scanner.valid:
            self._give_back("")
            return pos
        if arguments:
            self._unsent_arguments.append(arguments)
        if scanner.name is not None and (self._unsent_arguments or (scanner.done and not self._header_sent)):
            self._send_call_delta(scanner.name)
        if scanner.done:
            self.num_calls += 1
            self._scanner, self._attempt, self._header_sent, self._after_call = None, None, False, True
            self._state = then
        return pos

    def array_of_calls(self, text: str, pos: int, then: State, argument_keys: tuple[str, ...] = ARGUMENT_KEYS) -> int:
        """After a `[`: call objects separated by commas up to the `]`, then `then`."""
        self._after_array = then
        self._argument_keys = argument_keys
        self._state = self._array_item
        return pos

    def _array_item(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "{", then=self._array_call, otherwise=self._fail, consume=False)

    def _array_call(self, text: str, pos: int) -> int:
        return self.read_call(text, pos, then=self._array_separator, argument_keys=self._argument_keys)

    def _array_separator(self, text: str, pos: int) -> int:
        return self.expect(text, pos, ",", then=self._array_item, otherwise=self._array_end)

    def _array_end(self, text: str, pos: int) -> int:
        return self.expect(text, pos, "]", then=self._after_array, otherwise=self._after_array)

    def _fail(self, text: str, pos: int) -> int:
        self._give_back("")
        return pos

    # ------------------------------------------------------------ output

    def _send_call_delta(self, name: str) -> None:
        arguments = "".join(self._unsent_arguments)
        self._unsent_arguments.clear()
        if self._header_sent:
            self._calls.append(ToolCallDelta(self.num_calls, arguments))
        else:
            self._calls.append(ToolCallDelta(self.num_calls, arguments, self._call_id, name))
            self._header_sent = True

    def _emit_content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip(WHITESPACE)
            self._after_call = not text
        text = self._content_whitespace + text
        stripped = text.rstrip(WHITESPACE)
        if stripped:
            self._content.append(stripped)
        self._content_whitespace = text[len(stripped):]

    def _hold(self, text: str, is_content: bool) -> None:
        self._held, self._held_is_content = text, is_content

    def _give_back(self, held: str) -> None:
        """What looked like a call is not one: its text is content (what was not already sent
        as a call), and so is everything after it."""
        self.failed = True
        if not self._header_sent:
            raw = "".join(self._attempt or []) + (self._scanner.raw if self._scanner else "")
            self._emit_content(raw + held)
        elif held:
            self._emit_content(held)
        self._scanner, self._attempt, self._header_sent = None, None, False
        self._state = self._rest_is_content


def _partial_marker(text: str, pos: int, marker: str) -> int:
    """How many characters at the end of text[pos:] could be the start of `marker`."""
    for keep in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if marker.startswith(text[len(text) - keep:]):
            return keep
    return 0
