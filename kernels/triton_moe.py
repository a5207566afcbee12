"""The fused mixture-of-experts feed-forward on the GPU (the design of vLLM's and SGLang's
fused_moe): the step's (token, expert) pairs are sorted by expert into blocks of BLOCK_M rows,
each block padded so it holds one expert's rows only; then two grouped GEMMs run over those
blocks, each program multiplying its block's rows by its expert's weights:

1. gate-up: rows of `hidden` x w13[e]^T, with SiLU(gate) * up fused into the epilogue (two
   accumulators, one per half of w13), written to one row per (token, expert) pair;
2. down: those rows x w2[e]^T, times the pair's router weight, written per pair;

and the k pairs of each token are summed. Nothing reads a device value on the host: the grid
is sized by an upper bound of the padded rows, and blocks past the real end exit at once, so
the whole layer can be captured in a CUDA graph. The reference is `kernels.moe_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["BlockConfig", "block_config", "fused_moe", "moe_align", "moe_align_small", "moe_align_sorted"]


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode: a handful of rows per expert, so the GEMMs stream weights; small BLOCK_M wastes
# little on padding and narrow BLOCK_N gives enough programs to fill the SMs. Prefill: many
# rows per expert, so larger tiles reuse each loaded weight tile across more rows.
_DECODE = BlockConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
_MEDIUM = BlockConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3)
_PREFILL = BlockConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def block_config(num_tokens: int, top_k: int, num_experts: int) -> BlockConfig:
    """The tiles for a step of `num_tokens` tokens, by the mean rows each expert receives
    (a Python int from shapes, so each captured graph size gets its own fixed choice)."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        return _DECODE
    if rows_per_expert <= 64:
        return _MEDIUM
    return _PREFILL


# moe_align in one program, for steps whose (token, expert) pairs and experts make its
# [pairs, experts], [pairs, pairs] and [blocks, experts] tiles small (up to 16 tokens at
# Qwen3-30B-A3B's 128 experts and top-8): a decode step's align is then one launch per layer
# instead of some twenty torch ops of a few microseconds each. Larger steps sort with torch,
# where the sort's cost is shared by many rows.
_MAX_TILE_ELEMENTS = 16384


@triton.jit
def _moe_align_small_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr,
                            num_pairs, num_experts, max_rows,
                            BLOCK_M: tl.constexpr, PAIRS: tl.constexpr, EXPERTS: tl.constexpr,
                            ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """moe_align's outputs, every quantity a tile: per-expert counts from a one-hot of the
    pairs, padded run starts by a cumsum over experts, and each pair's rank in its run as the
    number of earlier pairs of its expert (so the order is a stable sort's)."""
    pairs = tl.arange(0, PAIRS)
    valid = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=valid, other=-1)  # padding matches no expert
    experts = tl.arange(0, EXPERTS)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    padded = (tl.sum(one_hot, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, 0)
    run_start = tl.sum(one_hot * (run_end - padded)[None, :], 1)
    earlier_same = (ids[:, None] == ids[None, :]) & (pairs[None, :] < pairs[:, None])
    dest = run_start + tl.sum(earlier_same.to(tl.int32), 1)
    rows = tl.arange(0, ROWS)
    tl.store(sorted_ids_ptr + rows, tl.full((ROWS,), 0, tl.int32) + num_pairs, mask=rows < max_rows)
    tl.debug_barrier()  # the padding is written before the pairs land on it
    tl.store(sorted_ids_ptr + dest, pairs, mask=valid)
    blocks = tl.arange(0, BLOCKS)
    # searchsorted(run_end, block start, right=True): the runs ending at or before the block.
    block_expert = tl.sum((run_end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), 1)
    tl.store(expert_ids_ptr + blocks, tl.minimum(block_expert, num_experts),
             mask=blocks < max_rows // BLOCK_M)
    tl.store(num_rows_ptr, tl.sum(padded, 0))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T * k (token, expert) pairs by expert, padding each expert's run to a multiple
    of `block_m`. Pair p is token p // k's j = p % k-th expert. Returns
    - sorted_ids [max_rows] int32: the pairs in expert order, padding slots holding T * k;
    - expert_ids [max_rows / block_m] int32: each block's expert (num_experts past the end);
    - num_rows [1] int32: the padded rows in use (blocks from there on have nothing to do).
    max_rows bounds the padded rows from shapes alone: each of the at most min(E, T * k) experts
    that receive pairs pads its run by fewer than block_m rows."""
    num_pairs = topk_ids.numel()
    max_rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    pairs_tile, experts_tile, blocks_tile = _align_tiles(num_pairs, num_experts, max_rows // block_m)
    if max(pairs_tile, blocks_tile) * max(pairs_tile, experts_tile) <= _MAX_TILE_ELEMENTS:
        return moe_align_small(topk_ids, num_experts, block_m, max_rows)
    return moe_align_sorted(topk_ids, num_experts, block_m, max_rows)


def _align_tiles(num_pairs: int, num_experts: int, num_blocks: int) -> tuple[int, int, int]:
    """The small kernel's tiles: pairs, experts, blocks."""
    return (triton.next_power_of_2(num_pairs), triton.next_power_of_2(num_experts),
            triton.next_power_of_2(num_blocks))


def moe_align_small(topk_ids: torch.Tensor, num_experts: int, block_m: int, max_rows: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align in one program (`_moe_align_small_kernel`)."""
    flat = topk_ids.flatten()
    device = flat.device
    pairs_tile, experts_tile, blocks_tile = _align_tiles(flat.numel(), num_experts, max_rows // block_m)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    _moe_align_small_kernel[(1,)](
        flat, sorted_ids, expert_ids, num_rows, flat.numel(), num_experts, max_rows,
        BLOCK_M=block_m, PAIRS=pairs_tile, EXPERTS=experts_tile,
        ROWS=triton.next_power_of_2(max_rows), BLOCKS=blocks_tile, num_warps=8)
    return sorted_ids, expert_ids, num_rows


def moe_align_sorted(topk_ids: torch.Tensor, num_experts: int, block_m: int, max_rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align by a stable sort and torch ops, for any size."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0, dtype=torch.int32)
    order = flat.argsort(stable=True)
    sorted_experts = flat[order].long()
    # A pair's place in its expert's run, then in the padded layout.
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    sorted_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_rows, block_m, dtype=torch.int32, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:]


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr,
                     N, K, num_pairs, a_row_div, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     up_offset,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """c[pair, n-tile] = a[pair // a_row_div] x b[expert]^T over this program's block of sorted
    pairs; GATED: silu(that) * (the same with b's rows from up_offset on); MUL_WEIGHT: times
    the pair's router weight. Padding rows (pair id == num_pairs) load zeros and store nothing."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_mask = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // a_row_div).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = (b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        if GATED:
            acc_up = tl.dot(a, tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0), acc_up,
                            input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=pair_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
              aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, a_row_div: int,
              gated: bool, config: BlockConfig) -> None:
    sorted_ids, expert_ids, num_rows = aligned
    assert a.stride(-1) == 1 and out.stride(-1) == 1
    grid = (expert_ids.numel(), triton.cdiv(n, config.block_n))
    _moe_gemm_kernel[grid](
        a, b, out, weights, sorted_ids, expert_ids, num_rows,
        n, b.shape[2], out.shape[0], a_row_div, a.stride(0), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), n * b.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GATED=gated,
        MUL_WEIGHT=not gated, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: BlockConfig | None = None) -> torch.Tensor:
    """As `kernels.moe_reference.fused_moe`; `config` overrides the tiles `block_config` picks."""
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = w2.shape[0], w2.shape[2]
    hidden_size = hidden.shape[1]
    if num_tokens == 0:
        return torch.empty_like(hidden)
    config = config or block_config(num_tokens, top_k, num_experts)
    aligned = moe_align(topk_ids, num_experts, config.block_m)
    weights = topk_weights.float().contiguous()
    num_pairs = num_tokens * top_k
    activated = torch.empty(num_pairs, intermediate, dtype=hidden.dtype, device=hidden.device)
    _moe_gemm(hidden, w13, activated, weights, aligned, intermediate, top_k, True, config)
    down = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _moe_gemm(activated, w2, down, weights, aligned, hidden_size, 1, False, config)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
