"""Structured outputs' token mask: one program per (masked row, block of the vocabulary) reads
the row's packed bits and writes -inf over the logits of forbidden tokens, in place and in
the logits' own dtype. Semantics: kernels.reference.apply_token_bitmask."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_SIZE = 4096


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, logits_stride, bitmask_ptr, bitmask_stride, rows_ptr,
                                vocab_size, num_words, BLOCK_SIZE: tl.constexpr):
    m = tl.program_id(0)
    row = tl.load(rows_ptr + m)
    columns = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    words = columns // 32
    packed = tl.load(bitmask_ptr + m * bitmask_stride + words, mask=words < num_words, other=0)
    forbidden = ((packed >> (columns % 32)) & 1) == 0
    tl.store(logits_ptr + row * logits_stride + columns, float("-inf"),
             mask=forbidden & (columns < vocab_size))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if not len(rows):
        return
    vocab_size = logits.shape[1]
    grid = (len(rows), triton.cdiv(vocab_size, _BLOCK_SIZE))
    _apply_token_bitmask_kernel[grid](logits, logits.stride(0), bitmask, bitmask.stride(0), rows,
                                      vocab_size, bitmask.shape[1], BLOCK_SIZE=_BLOCK_SIZE)
