"""Fused sampling: one pass over the logits, in their own dtype, to a token id per row.

Row i takes `argmax(logits[i])` when its temperature is 0 (greedy), otherwise
`argmax(logits[i] / T + Gumbel noise)`, which is a sample of `softmax(logits[i] / T)` (the
Gumbel-max trick). The noise is counter-based: column c of a row with key `seeds[i]` uses
output `c % 4` of Philox4x32-10 keyed by the 64-bit seed at counter `c // 4`. So a row's
token depends only on its logits, temperature and seed, never on its batch or position in it,
nor on the block and split sizes below.

Each program reads one split of a row (`split_size` columns, in tiles of `block_size`) and
keeps the best (score, column) of every slot of a tile in registers; a second, tiny kernel
reduces each row's splits. Splitting the vocabulary keeps the GPU busy at any batch size:
256 rows of 151936 columns make 256 x 19 programs, a single row 19.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_INT32_MAX = tl.constexpr(2 ** 31 - 1)
_SPLIT_SIZE = 8192
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    # tl.log2 is libdevice's accurate polynomial; the noise needs only the hardware's
    # approximation (relative error ~2^-22), which the interpreter lacks.
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel_log2(r, FAST_LOG: tl.constexpr):
    """Gumbel noise in log2 units, -log2(E) up to a constant, with E ~ Exp(1) built from a
    uniform uint32 r.

    E = -ln(1 - v) with v = (r + 0.5) / 2^32 in (0, 1]. A row's winner usually has a small E,
    so E keeps its relative precision there: below v = 1/16 (where 1 - v would lose v's low
    bits) it is the series v + v^2/2 + ... + v^5/5. v never is 0, so the noise is finite;
    v = 1 (r near 2^32) gives E = inf, a column that cannot win, as an E of ~17 could not.
    Returned: -log2(E / ln 2), as log2(ln 2) shifts every column alike."""
    v = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * (0.25 + v * 0.2)))) * 1.4426950408889634
    return -_log2(tl.where(v < 0.0625, series, -_log2(1.0 - v, FAST_LOG)), FAST_LOG)


@triton.jit
def _load(row_ptr, cols, end):
    return tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)


@triton.jit
def _keep_best(score, cols, best, best_col):
    # Strictly greater: of equal scores, the first column seen (the lowest) stays.
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit
def _gumbel_split_kernel(logits_ptr, stride_row, temperature_ptr, seeds_ptr,
                         partial_score_ptr, partial_col_ptr, vocab_size, num_splits,
                         SPLIT_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, FAST_LOG: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    seed = tl.load(seeds_ptr + row)
    # Scores in log2 units: logits * log2(e) / T - log2(E) ranks columns as logits / T + Gumbel.
    scale = 1.4426950408889634 / tl.where(greedy, 1.0, temperature)
    # A tile is BLOCK_SIZE / 4 Philox counters; counter q covers columns 4q .. 4q + 3, one per
    # output, loaded as four strided vectors in the counters' own layout (no shuffles).
    counters = tl.arange(0, BLOCK_SIZE // 4)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    # Each slot keeps the best score of the columns it saw, in increasing column order.
    best = tl.full((BLOCK_SIZE // 4,), float("-inf"), tl.float32)
    best_col = tl.zeros((BLOCK_SIZE // 4,), tl.int32)
    start = split * SPLIT_SIZE
    end = tl.minimum(start + SPLIT_SIZE, vocab_size)
    for base in tl.range(start, end, BLOCK_SIZE):
        cols = base + 4 * counters
        if greedy:
            for lane in tl.static_range(4):
                best, best_col = _keep_best(_load(row_ptr, cols + lane, end), cols + lane, best, best_col)
        else:
            r0, r1, r2, r3 = tl.randint4x(seed, base // 4 + counters)
            best, best_col = _keep_best(_load(row_ptr, cols, end) * scale + _gumbel_log2(r0, FAST_LOG),
                                        cols, best, best_col)
            best, best_col = _keep_best(_load(row_ptr, cols + 1, end) * scale + _gumbel_log2(r1, FAST_LOG),
                                        cols + 1, best, best_col)
            best, best_col = _keep_best(_load(row_ptr, cols + 2, end) * scale + _gumbel_log2(r2, FAST_LOG),
                                        cols + 2, best, best_col)
            best, best_col = _keep_best(_load(row_ptr, cols + 3, end) * scale + _gumbel_log2(r3, FAST_LOG),
                                        cols + 3, best, best_col)
    top = tl.max(best)
    # The lowest column reaching the top, as torch.argmax picks among ties (greedy rows). A
    # split of -inf scores only reports column 0, still a valid token id.
    top_col = tl.min(tl.where(best == top, best_col, _INT32_MAX))
    tl.store(partial_score_ptr + row * num_splits + split, top)
    tl.store(partial_col_ptr + row * num_splits + split, top_col)


@triton.jit
def _reduce_splits_kernel(partial_score_ptr, partial_col_ptr, out_ptr, num_splits,
                          BLOCK_SPLITS: tl.constexpr):
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_SPLITS)
    mask = splits < num_splits
    scores = tl.load(partial_score_ptr + row * num_splits + splits, mask=mask, other=float("-inf"))
    cols = tl.load(partial_col_ptr + row * num_splits + splits, mask=mask, other=_INT32_MAX)
    top = tl.max(scores)
    # Splits are in column order, so the lowest column among the tied splits is the first.
    tl.store(out_ptr + row, tl.min(tl.where(scores == top, cols, _INT32_MAX)).to(tl.int64))


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  split_size: int = _SPLIT_SIZE, block_size: int = _BLOCK_SIZE,
                  num_warps: int = _NUM_WARPS) -> torch.Tensor:
    """logits [B, vocab] (any float dtype, unit column stride, any row stride: 0 repeats one
    row), temperature [B] float32, seeds [B] int64 -> token ids [B] int64. The sizes tune
    speed only (block_size a power of two >= 16 dividing split_size); the tokens are the same."""
    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1 and split_size % block_size == 0 and block_size >= 16
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    # Small vocabularies (tests) get one tile that covers them rather than mostly masked ones.
    block_size = min(block_size, max(16, triton.next_power_of_2(vocab_size)))
    split_size = min(split_size, triton.cdiv(vocab_size, block_size) * block_size)
    num_splits = triton.cdiv(vocab_size, split_size)
    partial_scores = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    partial_cols = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)
    _gumbel_split_kernel[(num_rows, num_splits)](
        logits, logits.stride(0), temperature, seeds, partial_scores, partial_cols,
        vocab_size, num_splits, SPLIT_SIZE=split_size, BLOCK_SIZE=block_size,
        FAST_LOG=os.environ.get("TRITON_INTERPRET") != "1", num_warps=num_warps)
    _reduce_splits_kernel[(num_rows,)](partial_scores, partial_cols, out, num_splits,
                                       BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=1)
    return out
