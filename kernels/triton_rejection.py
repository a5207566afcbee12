"""Speculative decoding's rejection sampler (Leviathan et al., 2023) in two launches.

Request b proposed drafts d_0 .. d_{k-1}; the target's distributions at those positions are
p_j, the draft's q_j (a point mass on d_j without draft probabilities). A greedy request
accepts d_j while it is argmax(p_j). A sampled request accepts d_j while u_j * q_j(d_j) <=
p_j(d_j), u_j ~ U(0, 1), and at its first rejection j* recovers a sample of
max(p_j - q_j, 0) (of p_j if that residual is all zero), so every emitted token is
distributed as the target's. The row emits the accepted drafts, then the recovered token, or
the bonus token when all k were accepted, then -1 padding.

1. `_target_token_split_kernel`, a program per (request, position, vocabulary split): the
   best column of its split for the token the target takes at a position. Greedy requests
   need argmax(p_j) at every position (done in parallel, not up to the first mismatch:
   latency over a few wasted rows). Sampled requests need a full row only at j*, which their
   position-0 programs find from k gathered probabilities; the other positions exit at once.
2. `_emit_kernel`, a program per request: reduces the splits, finds the accepted prefix and
   writes the row.

Randomness is Philox keyed by seeds[b] (kernels.triton_sampling's helpers), counters
(c0, c1, c2, c3) = (j, 0, 1, 0) for u_j (output 0) and (c // 4, j, 2, 0) for column c's
recovery noise at position j (output c % 4). c2 keeps the two streams apart, and apart from
sample_gumbel's (c2 = 0) should the bonus token be drawn with the same key; so a request's
tokens depend on its seed, drafts and probabilities alone, never on its batch or the split
and block sizes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.triton_sampling import _INT32_MAX, _gumbel_log2, _keep_best, _load, _log2

_ACCEPT_STREAM = tl.constexpr(1)
_RECOVER_STREAM = tl.constexpr(2)
# A column whose residual is 0 races with log2(p) - 512 instead of -inf: log2 of a positive
# float32 is above -150 and the noise within about (-6, 33), so any positive-residual column
# beats it and p is sampled only when the whole residual is zero.
_FALLBACK_SHIFT = tl.constexpr(512.0)
_SPLIT_SIZE = 8192
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


@triton.jit
def _first_rejection(draft_ptr, target_ptr, stride_target, draft_probs_ptr, stride_draft, start,
                     num_draft, seed, HAS_DRAFT_PROBS: tl.constexpr, MAX_DRAFT: tl.constexpr):
    """A sampled request's first rejected position, num_draft when all drafts are accepted."""
    pos = tl.arange(0, MAX_DRAFT)
    valid = pos < num_draft
    rows = (start + pos).to(tl.int64)
    draft = tl.load(draft_ptr + rows, mask=valid, other=0)
    p = tl.load(target_ptr + rows * stride_target + draft, mask=valid, other=0.0).to(tl.float32)
    if HAS_DRAFT_PROBS:
        q = tl.load(draft_probs_ptr + rows * stride_draft + draft, mask=valid, other=0.0).to(tl.float32)
    else:
        q = 1.0
    zero = pos * 0
    r, _, _, _ = tl.philox(seed, pos, zero, zero + _ACCEPT_STREAM, zero)
    u = ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 24 bits, exact, in (0, 1)
    return tl.min(tl.where(valid & (u * q > p), pos, num_draft))


@triton.jit
def _recovery_score(p_row, q_row, cols, end, draft, r, HAS_DRAFT_PROBS: tl.constexpr, FAST_LOG: tl.constexpr):
    """log2(residual / E) up to a constant, E ~ Exp(1) from r: the exponential race's score."""
    p = tl.load(p_row + cols, mask=cols < end, other=0.0).to(tl.float32)
    if HAS_DRAFT_PROBS:
        residual = p - tl.load(q_row + cols, mask=cols < end, other=0.0).to(tl.float32)
    else:
        residual = tl.where(cols == draft, 0.0, p)
    weight = tl.where(residual > 0, _log2(residual, FAST_LOG), _log2(p, FAST_LOG) - _FALLBACK_SHIFT)
    return weight + _gumbel_log2(r, FAST_LOG)


@triton.jit
def _target_token_split_kernel(draft_ptr, cu_ptr, target_ptr, stride_target, draft_probs_ptr, stride_draft,
                               is_greedy_ptr, seeds_ptr, rejected_at_ptr, partial_score_ptr, partial_col_ptr,
                               vocab_size, max_num_draft, num_splits, HAS_DRAFT_PROBS: tl.constexpr,
                               MAX_DRAFT: tl.constexpr, SPLIT_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                               FAST_LOG: tl.constexpr):
    req = tl.program_id(0)
    pos = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(cu_ptr + req)
    num_draft = tl.load(cu_ptr + req + 1) - start
    greedy = tl.load(is_greedy_ptr + req) != 0
    # A sampled request needs one row, its first rejected: its position-0 programs find it.
    if (pos >= num_draft) | (~greedy & (pos > 0)):
        return
    seed = tl.load(seeds_ptr + req)
    if not greedy:
        pos = _first_rejection(draft_ptr, target_ptr, stride_target, draft_probs_ptr, stride_draft, start,
                               num_draft, seed, HAS_DRAFT_PROBS, MAX_DRAFT)
        if split == 0:
            tl.store(rejected_at_ptr + req, pos)
        if pos == num_draft:
            return
    row = (start + pos).to(tl.int64)
    p_row = target_ptr + row * stride_target
    q_row = draft_probs_ptr + row * stride_draft
    draft = tl.load(draft_ptr + row)
    # A tile is [BLOCK_SIZE / 4, 4]: Philox counter i of the tile gives its four outputs to
    # row i, columns 4i .. 4i + 3 of the tile.
    counters = tl.arange(0, BLOCK_SIZE // 4)
    tile = 4 * counters[:, None] + tl.arange(0, 4)[None, :]
    zero = counters * 0
    best = tl.full((BLOCK_SIZE // 4, 4), float("-inf"), tl.float32)
    best_col = tl.zeros((BLOCK_SIZE // 4, 4), tl.int32)
    begin = split * SPLIT_SIZE
    end = tl.minimum(begin + SPLIT_SIZE, vocab_size)
    for base in tl.range(begin, end, BLOCK_SIZE):
        cols = base + tile
        if greedy:
            score = _load(p_row, cols, end)
        else:
            r0, r1, r2, r3 = tl.philox(seed, base // 4 + counters, zero + pos, zero + _RECOVER_STREAM, zero)
            r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_SIZE // 4, 4))
            score = _recovery_score(p_row, q_row, cols, end, draft, r, HAS_DRAFT_PROBS, FAST_LOG)
        best, best_col = _keep_best(score, cols, best, best_col)
    top = tl.max(best)
    # The lowest column reaching the top, as torch.argmax picks among ties (greedy rows).
    top_col = tl.min(tl.where(best == top, best_col, _INT32_MAX))
    slot = (req * max_num_draft + pos) * num_splits + split
    tl.store(partial_score_ptr + slot, top)
    tl.store(partial_col_ptr + slot, top_col)


@triton.jit
def _emit_kernel(draft_ptr, cu_ptr, bonus_ptr, is_greedy_ptr, rejected_at_ptr, partial_score_ptr, partial_col_ptr,
                 out_ptr, max_num_draft, num_splits, MAX_DRAFT: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                 BLOCK_OUT: tl.constexpr):
    req = tl.program_id(0)
    start = tl.load(cu_ptr + req)
    num_draft = tl.load(cu_ptr + req + 1) - start
    greedy = tl.load(is_greedy_ptr + req) != 0
    # Written by the split kernel for sampled requests with drafts.
    rejected_at = tl.load(rejected_at_ptr + req, mask=~greedy & (num_draft > 0), other=num_draft)
    pos = tl.arange(0, MAX_DRAFT)
    valid = pos < num_draft
    draft = tl.load(draft_ptr + start + pos, mask=valid, other=-1)
    # The target's token at each position the split kernel covered: every one of a greedy
    # request, the first rejected one of a sampled request.
    splits = tl.arange(0, BLOCK_SPLITS)
    covered = tl.where(greedy, valid, valid & (pos == rejected_at))[:, None] & (splits < num_splits)[None, :]
    slots = (req * max_num_draft + pos)[:, None] * num_splits + splits[None, :]
    scores = tl.load(partial_score_ptr + slots, mask=covered, other=float("-inf"))
    cols = tl.load(partial_col_ptr + slots, mask=covered, other=_INT32_MAX)
    top = tl.max(scores, axis=1)
    # Splits are in column order, so the lowest column among the tied splits is the first.
    target_token = tl.min(tl.where(scores == top[:, None], cols, _INT32_MAX), axis=1).to(tl.int64)
    accepted = tl.where(greedy, draft == target_token, pos < rejected_at)
    num_accepted = tl.min(tl.where(valid & ~accepted, pos, num_draft))
    last = tl.where(num_accepted < num_draft, tl.sum(tl.where(pos == num_accepted, target_token, 0)),
                    tl.load(bonus_ptr + req))
    out = tl.arange(0, BLOCK_OUT)
    tokens = tl.load(draft_ptr + start + out, mask=out < num_accepted, other=-1)
    tokens = tl.where(out == num_accepted, last, tokens)
    tl.store(out_ptr + req * (max_num_draft + 1) + out, tokens, mask=out <= max_num_draft)


def rejection_sample(draft_token_ids: torch.Tensor, cu_num_draft: torch.Tensor, target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None, bonus_token_ids: torch.Tensor, is_greedy: torch.Tensor,
                     seeds: torch.Tensor, max_num_draft: int, split_size: int = _SPLIT_SIZE,
                     block_size: int = _BLOCK_SIZE, num_warps: int = _NUM_WARPS) -> torch.Tensor:
    """See kernels.ops.rejection_sample, which checks the shapes. The probabilities need a unit
    column stride; no request may have more than max_num_draft drafts (not checked: that
    would cost a sync). The sizes tune speed only (block_size a power of two >= 16 dividing
    split_size); the tokens are the same."""
    num_reqs = len(bonus_token_ids)
    vocab_size = target_probs.shape[1]
    assert target_probs.stride(1) == 1 and (draft_probs is None or draft_probs.stride(1) == 1)
    assert split_size % block_size == 0 and block_size >= 16
    out = torch.empty(num_reqs, max_num_draft + 1, dtype=torch.int64, device=target_probs.device)
    if num_reqs == 0:
        return out
    # Small vocabularies (tests) get one tile that covers them rather than mostly masked ones.
    block_size = min(block_size, max(16, triton.next_power_of_2(vocab_size)))
    split_size = min(split_size, triton.cdiv(vocab_size, block_size) * block_size)
    num_splits = triton.cdiv(vocab_size, split_size)
    partial_scores = torch.empty(num_reqs, max_num_draft, num_splits, dtype=torch.float32, device=out.device)
    partial_cols = torch.empty(num_reqs, max_num_draft, num_splits, dtype=torch.int32, device=out.device)
    has_draft_probs = draft_probs is not None
    draft_probs = draft_probs if has_draft_probs else target_probs  # a pointer never read
    rejected_at = torch.empty(num_reqs, dtype=torch.int32, device=out.device)
    max_draft = max(2, triton.next_power_of_2(max_num_draft))
    if len(draft_token_ids):
        _target_token_split_kernel[(num_reqs, max_num_draft, num_splits)](
            draft_token_ids, cu_num_draft, target_probs, target_probs.stride(0), draft_probs, draft_probs.stride(0),
            is_greedy, seeds, rejected_at, partial_scores, partial_cols, vocab_size, max_num_draft, num_splits,
            HAS_DRAFT_PROBS=has_draft_probs, MAX_DRAFT=max_draft, SPLIT_SIZE=split_size, BLOCK_SIZE=block_size,
            FAST_LOG=os.environ.get("TRITON_INTERPRET") != "1", num_warps=num_warps)
    _emit_kernel[(num_reqs,)](
        draft_token_ids, cu_num_draft, bonus_token_ids, is_greedy, rejected_at, partial_scores, partial_cols, out,
        max_num_draft, num_splits, MAX_DRAFT=max_draft, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_OUT=triton.next_power_of_2(max_num_draft + 1), num_warps=1)
    return out
