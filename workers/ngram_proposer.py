"""NgramProposer: draft tokens for speculative decoding by prompt lookup.

Prompt lookup guesses that text repeats itself: when the last n tokens of a request already
occurred earlier in its prompt or output, the tokens that followed that earlier occurrence
are a good guess for what comes next (code edits, quoting, summarizing, structured output).
The target model then verifies the guess in one forward pass. There is no draft model: a
proposal is a substring search over token ids already on the host, so it costs a few numpy
passes over the batch's rows and no GPU time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from workers.step_inputs import StepInputs

_NO_TOKEN = -1  # pads the drafts of rows proposing fewer than k tokens
# Up to this many rows, each row is searched on its own with bytes.rfind: a few microseconds a
# row, where the vectorized search's fixed cost of some twenty numpy passes (about 150 us)
# would sit on a small batch's critical path between steps.
_MAX_ROWS_SEARCHED_ONE_BY_ONE = 4
_TOKEN_BYTES = np.dtype(np.int64).itemsize


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int) -> None:
        if prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {prompt_lookup_min}")
        if prompt_lookup_max < prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max must be in [prompt_lookup_min={prompt_lookup_min}, inf), "
                             f"got {prompt_lookup_max}")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self.k = num_speculative_tokens

    def prepare(self, inputs: StepInputs, max_query_len: int) -> None:
        """Prompt lookup keeps no state beyond the batch's tokens."""

    def capture_graphs(self) -> None:
        """Prompt lookup runs on the host."""

    def propose(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                max_num_draft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """token_ids: [R, W] int64 (the batch's rows), num_tokens: [R] valid length of each row,
        rows: [n] row indices to propose for, max_num_draft: [n] per-row cap in [0, k].
        Returns (drafts [n, k] int64 padded with -1, num_draft [n] int64).

        For n from prompt_lookup_max down to prompt_lookup_min, the first n whose suffix
        t[L-n:L] occurs earlier (followed by at least one token) wins; the most recent such
        occurrence gives the draft t[s+n : s+n+min(k, cap)], truncated at L."""
        if len(rows) <= _MAX_ROWS_SEARCHED_ONE_BY_ONE:
            return self._propose_one_by_one(token_ids, num_tokens, rows, max_num_draft)
        return self._propose_vectorized(token_ids, num_tokens, rows, max_num_draft)

    def _empty_drafts(self, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((num_rows, self.k), _NO_TOKEN, dtype=np.int64), np.zeros(num_rows, dtype=np.int64)

    def _propose_one_by_one(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                            max_num_draft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        drafts, num_draft = self._empty_drafts(len(rows))
        for i, row in enumerate(rows):
            draft = self._propose_row(token_ids[row, :num_tokens[row]], int(min(max_num_draft[i], self.k)))
            drafts[i, :len(draft)] = draft
            num_draft[i] = len(draft)
        return drafts, num_draft

    def _propose_vectorized(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                            max_num_draft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        drafts, num_draft = self._empty_drafts(len(rows))
        lengths = num_tokens[rows]
        width = int(lengths.max())
        if width <= self.min_n:  # a match needs L >= n + 1 tokens
            return drafts, num_draft
        tokens = token_ids[rows, :width]
        best_end = self._last_match_ends(tokens, lengths)
        found = best_end >= 0
        start = best_end + 1
        num_draft[found] = np.minimum(np.minimum(max_num_draft, self.k), lengths - start)[found]
        offsets = np.arange(self.k)
        in_draft = offsets < num_draft[:, None]
        cols = np.minimum(start[:, None] + offsets, width - 1)
        drafts[in_draft] = np.take_along_axis(tokens, cols, axis=1)[in_draft]
        return drafts, num_draft

    def _last_match_ends(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per row of tokens [n, W] (valid up to `lengths`), the last position e of the most
        recent earlier occurrence of its longest matching suffix n-gram; -1 where none."""
        num_rows, width = tokens.shape
        row_idx = np.arange(num_rows)
        # Occurrences are indexed by their last position e = s + n - 1, so an n-gram match is
        # an (n-1)-gram match whose token n - 1 places back also agrees: all sizes share one
        # search. Only the last token is compared over the whole width; longer n-grams are
        # checked on the surviving candidates alone, usually a handful per row.
        flat_tokens = tokens.ravel()
        last = tokens[row_idx, np.maximum(lengths - 1, 0)]
        # Flat positions, sorted by (row, e); flatnonzero is several times faster than a 2-D nonzero.
        cand = np.flatnonzero(tokens == last[:, None])
        cand_row, cand_end = np.divmod(cand, width)
        # The suffix itself does not count, a token must follow, and columns past a row's
        # length are stale: e <= L - 2.
        keep = cand_end < lengths[cand_row] - 1
        best_end = np.full(num_rows, -1, dtype=np.int64)  # -1: no match
        for n in range(1, min(self.max_n, width - 1) + 1):  # a match needs L >= n + 1
            if n > 1:
                suffix_token = tokens[row_idx, np.maximum(lengths - n, 0)]
                # cand - (n - 1) may fall before its row (or wrap, within the array since
                # n < width); those candidates are masked out by e >= n - 1.
                keep = (cand_end >= n - 1) & (flat_tokens[cand - (n - 1)] == suffix_token[cand_row])
            cand, cand_row, cand_end = cand[keep], cand_row[keep], cand_end[keep]  # stays sorted
            if not len(cand):
                break
            if n >= self.min_n:
                # A row's most recent occurrence is its last candidate.
                is_last = np.append(cand_row[1:] != cand_row[:-1], True)
                # Larger n overwrites smaller: the longest matching n-gram wins.
                best_end[cand_row[is_last]] = cand_end[is_last]
        return best_end

    def _propose_row(self, tokens: np.ndarray, max_num_draft: int) -> np.ndarray:
        """One row's draft, as `propose` defines it, by substring search over the row's bytes."""
        length = len(tokens)
        # Occurrences must end by L - 2 so that a token follows: search tokens[:L - 1].
        haystack = tokens[:length - 1].astype(np.int64, copy=False).tobytes()
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            needle = tokens[length - n:].astype(np.int64, copy=False).tobytes()
            end = len(haystack)
            while (found := haystack.rfind(needle, 0, end)) >= 0 and found % _TOKEN_BYTES:
                end = found + len(needle) - 1  # a match straddling tokens: look further back
            if found >= 0:
                start = found // _TOKEN_BYTES + n
                return tokens[start:min(start + max_num_draft, length)]
        return tokens[:0]
