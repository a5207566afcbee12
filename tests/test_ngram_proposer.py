"""NgramProposer tests on the CPU: the vectorized proposer against a straightforward
pure-Python reference of prompt lookup, on batches of random rows (small vocabularies, so
n-grams repeat, overlap and sometimes do not occur at all), plus readable examples and
argument validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.ngram_proposer import NgramProposer


def reference_propose(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The draft for one row, by definition: the longest n-gram suffix with an earlier
    occurrence followed by at least one token; its most recent occurrence; up to k tokens
    after it."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        for s in range(length - 1 - n, -1, -1):
            if tokens[s:s + n] == tokens[length - n:]:
                return tokens[s + n:min(s + n + k, length)]
    return []


def propose(proposer: NgramProposer, seqs: list[list[int]], caps: list[int],
            rows: list[int] | None = None, width: int = 64) -> list[list[int]]:
    """Lays `seqs` out as batch rows (in the order `rows`, default 0..), asks for all of them
    and returns each one's draft, checking the padding on the way."""
    rows = list(range(len(seqs))) if rows is None else rows
    token_ids = np.full((max(rows) + 1, width), 999, dtype=np.int64)  # garbage past each row's end
    num_tokens = np.zeros(max(rows) + 1, dtype=np.int64)
    for row, seq in zip(rows, seqs):
        token_ids[row, :len(seq)] = seq
        num_tokens[row] = len(seq)
    drafts, num_draft = proposer.propose(token_ids, num_tokens, np.array(rows, dtype=np.int64),
                                         np.array(caps, dtype=np.int64))
    assert drafts.shape == (len(rows), proposer.k) and drafts.dtype == np.int64
    assert num_draft.shape == (len(rows),) and num_draft.dtype == np.int64
    assert (drafts[np.arange(proposer.k) >= num_draft[:, None]] == -1).all()
    return [drafts[i, :num_draft[i]].tolist() for i in range(len(rows))]


def expected(seqs: list[list[int]], caps: list[int], min_n: int, max_n: int, k: int) -> list[list[int]]:
    return [reference_propose(seq, min_n, max_n, min(k, cap)) for seq, cap in zip(seqs, caps)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), min_n=st.integers(1, 4), extra_n=st.integers(0, 3), k=st.integers(1, 6),
       vocab=st.integers(1, 5))
def test_matches_reference(data, min_n: int, extra_n: int, k: int, vocab: int) -> None:
    """Rows of different lengths (including 0 and shorter than the n-grams) in one call, caps
    anywhere in [0, k]; a vocabulary of 1 makes every row a run overlapping its own suffix."""
    max_n = min_n + extra_n
    seqs = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=40), min_size=1, max_size=8))
    caps = data.draw(st.lists(st.integers(0, k), min_size=len(seqs), max_size=len(seqs)))
    proposer = NgramProposer(min_n, max_n, k)
    assert propose(proposer, seqs, caps) == expected(seqs, caps, min_n, max_n, k)


def test_matches_reference_seeded_batches() -> None:
    """Larger batches in a shuffled subset of rows, as the model runner asks for them."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        k = int(rng.integers(1, 8))
        proposer = NgramProposer(min_n, max_n, k)
        num_rows = int(rng.integers(1, 32))
        vocab = int(rng.integers(2, 20))
        seqs = [rng.integers(0, vocab, size=rng.integers(0, 200)).tolist() for _ in range(num_rows)]
        caps = rng.integers(0, k + 1, size=num_rows).tolist()
        rows = rng.permutation(2 * num_rows)[:num_rows].tolist()
        assert propose(proposer, seqs, caps, rows, width=256) == expected(seqs, caps, min_n, max_n, k)


def test_repeated_phrase_proposes_its_continuation() -> None:
    the, cat, sat, on, mat, dot = 1, 2, 3, 4, 5, 6
    proposer = NgramProposer(1, 3, 4)
    seq = [the, cat, sat, on, the, mat, dot, the, cat, sat]
    assert propose(proposer, [seq], [4]) == [[on, the, mat, dot]]
    assert propose(proposer, [seq], [2]) == [[on, the]]  # the per-row cap
    assert propose(proposer, [seq], [0]) == [[]]


def test_longest_ngram_wins_then_most_recent_occurrence() -> None:
    proposer = NgramProposer(1, 2, 2)
    # "5" alone last occurs before 8, but the 2-gram "4 5" occurs only before 7.
    assert propose(proposer, [[4, 5, 7, 7, 5, 8, 4, 5]], [2]) == [[7, 7]]
    # No 2-gram match: the most recent "5" wins.
    assert propose(proposer, [[5, 7, 5, 8, 3, 5]], [2]) == [[8, 3]]


def test_edge_cases() -> None:
    proposer = NgramProposer(2, 3, 3)
    assert propose(proposer, [[1, 2, 9, 1, 2]], [3]) == [[9, 1, 2]]  # match at the very start
    assert propose(proposer, [[1, 2, 1, 2]], [3]) == [[1, 2]]  # the draft stops at L
    assert propose(proposer, [[7, 7, 7, 7]], [3]) == [[7]]  # suffix overlaps its occurrence
    assert propose(proposer, [[1, 2, 3, 4]], [3]) == [[]]  # no match
    assert propose(proposer, [[1, 1], [1], []], [3, 3, 3]) == [[], [], []]  # L <= n
    assert propose(NgramProposer(1, 8, 3), [[1, 1]], [3]) == [[1]]  # max n beyond every row
    # Small batches search each row's bytes: 1's bytes occur inside those of (256, 0), one byte
    # off a token boundary, which is no occurrence of the token 1.
    assert propose(NgramProposer(1, 1, 2), [[256, 0, 5, 1]], [2]) == [[]]
    assert propose(NgramProposer(1, 1, 2), [[1, 7, 256, 0, 5, 1]], [2]) == [[7, 256]]
    drafts, num_draft = proposer.propose(np.zeros((2, 8), dtype=np.int64), np.zeros(2, dtype=np.int64),
                                         np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert drafts.shape == (0, 3) and num_draft.shape == (0,)


@pytest.mark.parametrize("args, message", [
    ((0, 2, 1), "prompt_lookup_min must be >= 1, got 0"),
    ((3, 2, 1), r"prompt_lookup_max must be in \[prompt_lookup_min=3, inf\), got 2"),
    ((1, 2, 0), "num_speculative_tokens must be >= 1, got 0"),
])
def test_validation(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NgramProposer(*args)
