"""Structured outputs' token-mask kernel against its torch reference, under the Triton
interpreter; and the reference against the plain meaning of the bits."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from kernels import reference
from triton_interpreter import interpreter_tests, run_cases


def random_bitmask(num_rows: int, vocab_size: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed mask and the [num_rows, vocab_size] bool it means."""
    num_words = -(-vocab_size // 32)
    allowed = torch.rand(num_rows, num_words * 32) < density
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int64)
    packed = (allowed.view(num_rows, num_words, 32).long() * weights).sum(-1).to(torch.int32)
    return packed, allowed[:, :vocab_size]


def test_reference_forbids_exactly_the_cleared_bits_of_the_masked_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    bitmask, allowed = random_bitmask(2, 100, 0.3)
    rows = torch.tensor([3, 0])
    out = logits.clone()
    reference.apply_token_bitmask(out, bitmask, rows)
    expected = logits.clone()
    expected[rows] = expected[rows].masked_fill(~allowed, float("-inf"))
    assert torch.equal(out, expected)
    assert torch.equal(out[[1, 2, 4]], logits[[1, 2, 4]])  # rows without a grammar untouched


def _case(num_rows: int, num_masked: int, vocab_size: int, dtype: torch.dtype) -> Callable[[], None]:
    def case() -> None:
        from kernels.triton_bitmask import apply_token_bitmask

        logits = torch.randn(num_rows, vocab_size).to(dtype)
        bitmask, _ = random_bitmask(num_masked, vocab_size, 0.5)
        rows = torch.randperm(num_rows)[:num_masked]
        expected, out = logits.clone(), logits.clone()
        reference.apply_token_bitmask(expected, bitmask, rows)
        apply_token_bitmask(out, bitmask, rows)
        assert torch.equal(out, expected)
    return case


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "bitmask_float32_vocab_not_a_multiple_of_32": _case(6, 4, 1000, torch.float32),
    "bitmask_float16_every_row": _case(3, 3, 4100, torch.float16),
    "bitmask_no_rows": _case(2, 0, 64, torch.float32),
}

interpreter_results, test_triton_kernel_matches_reference = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])
