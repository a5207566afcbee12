"""Incremental detokenization and stop-string matching, per engine request.

`IncrementalDetokenizer` turns each step's new token ids into new text with one call into the
Rust `DecodeStream`, which buffers a multi-byte character split across tokens until it is
complete: the whole output is never re-decoded. `StopStringMatcher` finds stop strings across
delta boundaries and holds back the last `len(longest stop) - 1` characters, so a stop string
is never partly streamed before it is recognized.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# At most this many prompt tokens are replayed into a new DecodeStream so the first output
# token decodes with the spacing it has in context (SentencePiece-style decoders strip the
# leading space of a text's first token).
_PRIME_MAX = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=self._prime_ids(prompt_token_ids), skip_special_tokens=skip_special_tokens)

    def _prime_ids(self, prompt_token_ids: list[int]) -> list[int]:
        # The stream takes the decoded priming ids as its prefix only when they decode to
        # whole characters: take the longest such suffix of the prompt.
        for n in range(min(len(prompt_token_ids), _PRIME_MAX), 0, -1):
            suffix = prompt_token_ids[-n:]
            if "\ufffd" not in self._tokenizer.decode(suffix, skip_special_tokens=self._skip_special_tokens):
                return suffix
        return []

    def update(self, new_token_ids: list[int]) -> str:
        """The text that `new_token_ids` complete; "" while a character is still partial."""
        if not new_token_ids:
            return ""
        try:
            text = self._stream.step(self._tokenizer, new_token_ids)
        except Exception:
            # DecodeStream refuses a step whose decoding rewrites text it already returned
            # ("Invalid prefix encountered"); restart it rather than fail the request.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            text = self._stream.step(self._tokenizer, new_token_ids)
        return text or ""


class StopStringMatcher:
    """Finds the first stop string to complete in a growing text given as deltas.

    Keeps only the last `len(longest stop) - 1` characters of the text: enough to find a stop
    string that straddles a delta boundary, and exactly what is held back from the client.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        self._stop = [s for s in stop if s]
        self._window = max(map(len, self._stop), default=1) - 1
        self._hold = 0 if include_stop_str_in_output else self._window
        self._include = include_stop_str_in_output
        self._tail = ""  # the last `_window` characters seen
        self._unsent = 0  # how many characters at the end of `_tail` are not yet released

    def update(self, new_text: str, final: bool) -> tuple[str, str | None]:
        """Return (text to release now, the stop string matched or None).

        After a match the request is finished: the released text ends just before the stop
        string (or just after it with `include_stop_str_in_output`). `final` releases the held
        text, as the request ends anyway.
        """
        buf = self._tail + new_text
        unsent = self._unsent + len(new_text)
        first_unsent = len(buf) - unsent
        # The stop string that is complete first wins (the longest if several end together),
        # as if the text arrived one character at a time: the result is the same however the
        # text is split into deltas. A match inside already-scanned text would have been found
        # before, so only where the new text could complete one is searched.
        search_from = max(0, len(self._tail) - self._window)
        match, match_at, match_end = None, 0, len(buf) + 1
        for stop in self._stop:
            i = buf.find(stop, search_from)
            if i != -1 and (i + len(stop), i) < (match_end, match_at):
                match, match_at, match_end = stop, i, i + len(stop)
        if match is not None:
            end = match_at + len(match) if self._include else match_at
            return buf[first_unsent:end], match
        keep = 0 if final else min(self._hold, unsent)
        self._unsent = keep
        self._tail = buf[-self._window:] if self._window else ""
        return buf[first_unsent:len(buf) - keep], None
