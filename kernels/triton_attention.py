"""Paged attention in Triton; semantics are those of `kernels.reference`.

The kernel serves every batch in one launch: prefill chunks over a cached prefix, decodes,
speculative-decoding verification and requests with no query tokens this step. Its grid and
its configuration depend only on tensor shapes, never on tensor values, so a call makes no host
sync and can be captured in a CUDA graph. A decode batch may also come with the order in which
to start its requests' programs (longest first, from the CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_device import num_sms
from kernels.triton_e4m3 import E4M3_AS_FP16_SCALE, e4m3_as_fp16

# exp2 is cheaper than exp on the GPU; folding log2(e) into the softmax scale makes them equal.
_LOG2E = 1.4426950408889634
# The running max starts from a finite floor rather than -inf: a query row that sees no key in
# some KV range (a split wholly past its causal boundary) then rescales by
# exp2(floor - floor) = 1 an all-zero accumulator, instead of by exp2(-inf + inf) = NaN.
_NEG_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _first_tile(query_start_loc_ptr, req, BLOCK_Q: tl.constexpr):
    """Request `req`'s first query tile. Request i's tiles start at
    `query_start_loc[i] // BLOCK_Q + i`, a strictly increasing sequence: each request gets at most
    one partial tile more than its share of the flat token range, so the grid size depends on
    shapes only (and past the last request, this is the grid size)."""
    return tl.load(query_start_loc_ptr + req) // BLOCK_Q + req


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q: tl.constexpr):
    """The request owning query tile `tile`: the last one whose first tile is <= tile.

    In a decode batch (one query per request) request i's first tile is i + i // BLOCK_Q, so
    the guess below is right and two loads confirm it; otherwise a binary search finds it. The
    search's chain of dependent loads would delay every decode program's first KV load."""
    guess = tl.minimum(tile // (BLOCK_Q + 1) * BLOCK_Q + tl.minimum(tile % (BLOCK_Q + 1), BLOCK_Q - 1),
                       num_reqs - 1)
    req = guess
    if (_first_tile(query_start_loc_ptr, guess, BLOCK_Q) > tile) | \
            (_first_tile(query_start_loc_ptr, guess + 1, BLOCK_Q) <= tile):
        lo: tl.int32 = 0
        hi: tl.int32 = num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_tile(query_start_loc_ptr, mid, BLOCK_Q) <= tile:
                lo = mid + 1
            else:
                hi = mid
        req = lo - 1
    return req


@triton.jit
def _attend_kv_tiles(acc, row_sum, row_max, q, k_ptr, v_ptr, block_table_ptr, q_pos, kv_end,
                     tile_lo, tile_hi, qk_scale, stride_cache_block, stride_cache_slot, dims,
                     dim_mask,
                     CAUSAL_MASK: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, FP8_AS_FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """Online softmax of the query tile over KV tiles [tile_lo, tile_hi) of BLOCK_N keys.

    Without CAUSAL_MASK every key of those tiles is visible to every query row: the caller puts
    only the tiles before the causal boundary of the query tile's first row there, which is all
    of a long context but the last tile, and skips the masking arithmetic for them."""
    offs_n = tl.arange(0, BLOCK_N)
    for kv_tile in range(tile_lo, tile_hi):
        kv_pos = kv_tile * BLOCK_N + offs_n
        if CAUSAL_MASK:
            kv_valid = kv_pos < kv_end
            pages = tl.load(block_table_ptr + kv_pos // PAGE_SIZE, mask=kv_valid, other=0)
            kv_mask = kv_valid[:, None] & dim_mask[None, :]
        else:
            pages = tl.load(block_table_ptr + kv_pos // PAGE_SIZE)
            kv_mask = dim_mask[None, :]
        offsets = (pages.to(tl.int64)[:, None] * stride_cache_block
                   + (kv_pos % PAGE_SIZE)[:, None] * stride_cache_slot + dims[None, :])
        # Masked-off slots load as 0: stale cache memory may hold NaN, and 0 * NaN poisons.
        k = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0)
        if FP8_AS_FP16:  # q is float16 too; the scales (applied outside the loop) carry the 2^8
            k, v = e4m3_as_fp16(k, USE_ASM), e4m3_as_fp16(v, USE_ASM)
        else:  # the model's dtype, or an FP8 cache under a float32 query
            k, v = k.to(q.dtype), v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL_MASK:
            scores = tl.where(kv_pos[None, :] <= q_pos[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


# Triton compiles a variant of a kernel for each integer argument equal to 1, divisible by 16,
# or neither. The request and row counts change every step: specialized, their combinations
# (with the configuration's constants) outnumber what the model runner's warm-up can compile,
# and an eager step meeting a new one compiled it mid-run, stalling the GPU for most of a second
# (docs/benchmarks.md, the Qwen2.5-1.5B shape, whose 12 heads make the row count's divisibility
# vary). They are loop bounds and offsets, not strides: specializing them gains nothing.
@triton.jit(do_not_specialize=["num_reqs", "num_split_rows"])
def _paged_attention_kernel(
    query_ptr, cache_ptr, out_ptr, split_acc_ptr, split_stats_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, decode_order_ptr,
    qk_scale, v_scale, num_reqs, num_heads, num_split_rows,
    stride_q_t, stride_q_h, stride_out_t, stride_out_h,
    stride_cache_kv, stride_cache_block, stride_cache_slot, stride_cache_h,
    stride_block_tables,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DECODE_ORDER: tl.constexpr,
    FP8_AS_FP16: tl.constexpr, USE_ASM: tl.constexpr,
):
    """One program: a tile of BLOCK_Q query tokens x the GROUP query heads of one KV head (so
    the group's heads share every K/V load), over the KV range of one split.

    Row r of the tile is query token r // GROUP, head kv_head * GROUP + r % GROUP."""
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    split = tl.program_id(2)
    if HAS_DECODE_ORDER:
        # One query per request. Programs start in grid order, axis 0 fastest: every KV head of
        # request decode_order[0], then of decode_order[1], ... The heads of a request read
        # neighbouring cache bytes (a slot holds all its heads), and with the longest requests
        # first the short ones fill the end of the launch instead of a long one running alone.
        kv_head = tl.program_id(0)
        req = tl.load(decode_order_ptr + tl.program_id(1))
        q_begin = tl.load(query_start_loc_ptr + req)
        num_queries = tl.load(query_start_loc_ptr + req + 1) - q_begin
        q_tile = 0
    else:
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        req = _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q)
        q_begin = tl.load(query_start_loc_ptr + req)
        num_queries = tl.load(query_start_loc_ptr + req + 1) - q_begin
        q_tile = tile - (q_begin // BLOCK_Q + req)
    if q_tile * BLOCK_Q >= num_queries:  # the grid's spare tiles, and requests with no queries
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - num_queries

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < num_queries)
    q_pos = context_len + q_idx  # absolute position of each row's query token
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    tokens = (q_begin + q_idx).to(tl.int64)
    q = tl.load(query_ptr + tokens[:, None] * stride_q_t + heads[:, None] * stride_q_h + dims[None, :],
                mask=row_valid[:, None] & dim_mask[None, :], other=0.0)
    if FP8_AS_FP16:
        # Scaled by 2^-8 (qk_scale holds the 2^8) so that no bf16 query overflows float16.
        q = (q.to(tl.float32) * (1.0 / 256.0)).to(tl.float16)

    # Keys [0, kv_end) are visible to some row of the tile; keys below the first row's position
    # (+1) to all rows, so the tiles entirely below it need no causal mask.
    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    num_kv_tiles = tl.cdiv(kv_end, BLOCK_N)
    num_unmasked_tiles = (first_pos + 1) // BLOCK_N
    # Flash-decoding: each split takes an equal share of this request's KV tiles.
    tiles_per_split = tl.cdiv(num_kv_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_kv_tiles)

    k_ptr = cache_ptr + kv_head * stride_cache_h
    v_ptr = k_ptr + stride_cache_kv
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_block_tables
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], _NEG_FLOOR, dtype=tl.float32)
    acc, row_sum, row_max = _attend_kv_tiles(
        acc, row_sum, row_max, q, k_ptr, v_ptr, block_table_ptr, q_pos, kv_end,
        tile_lo, tl.minimum(tile_hi, num_unmasked_tiles), qk_scale,
        stride_cache_block, stride_cache_slot, dims, dim_mask,
        CAUSAL_MASK=False, BLOCK_N=BLOCK_N, PAGE_SIZE=PAGE_SIZE, DOT_PRECISION=DOT_PRECISION,
        FP8_AS_FP16=FP8_AS_FP16, USE_ASM=USE_ASM)
    acc, row_sum, row_max = _attend_kv_tiles(
        acc, row_sum, row_max, q, k_ptr, v_ptr, block_table_ptr, q_pos, kv_end,
        tl.maximum(tile_lo, num_unmasked_tiles), tile_hi, qk_scale,
        stride_cache_block, stride_cache_slot, dims, dim_mask,
        CAUSAL_MASK=True, BLOCK_N=BLOCK_N, PAGE_SIZE=PAGE_SIZE, DOT_PRECISION=DOT_PRECISION,
        FP8_AS_FP16=FP8_AS_FP16, USE_ASM=USE_ASM)

    acc = acc * v_scale  # an FP8 cache's values are value / v_scale; 1.0 otherwise
    out_mask = row_valid[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / row_sum[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_out_t + heads[:, None] * stride_out_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Unnormalized partials, [tokens * heads, splits, ...]; _combine_splits_kernel merges them.
        split_row = (tokens * num_heads + heads) * NUM_SPLITS + split
        tl.store(split_acc_ptr + split_row[:, None] * BLOCK_D + dims[None, :], acc, mask=out_mask)
        tl.store(split_stats_ptr + split_row, row_max, mask=row_valid)
        tl.store(split_stats_ptr + num_split_rows + split_row, row_sum, mask=row_valid)


@triton.jit(do_not_specialize=["num_split_rows"])
def _combine_splits_kernel(split_acc_ptr, split_stats_ptr, out_ptr, num_heads, num_split_rows,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           NUM_SPLITS: tl.constexpr):
    """out[token, head] from its splits' (acc, max, sum): rescale each to the global max."""
    row = tl.program_id(0) * num_heads + tl.program_id(1)
    splits = row * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    split_max = tl.load(split_stats_ptr + splits)
    split_sum = tl.load(split_stats_ptr + num_split_rows + splits)
    weight = tl.exp2(split_max - tl.max(split_max, 0))
    acc = tl.load(split_acc_ptr + splits[:, None] * BLOCK_D + dims[None, :])
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(split_sum * weight, 0)
    tl.store(out_ptr + row.to(tl.int64) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows per program: block_m // group query tokens x group heads
    block_n: int  # keys per inner-loop step
    num_splits: int  # programs sharing one query tile's KV range (flash-decoding); 1: no split
    num_warps: int
    num_stages: int


# Batches averaging at most this many query tokens per request (decodes, speculative
# verification) are memory-bound: small query tiles, and KV splits when the requests alone
# leave the GPU idle. A CUDA graph's padding request counts among the requests: verifying 8
# drafts for one request is 9 tokens over 2 requests, which the prefill configuration would
# give a single program per KV head.
_DECODE_QUERIES_PER_REQ = 8
# Splitting pays while the requests alone give the GPU fewer than about four programs per
# multiprocessor (H100, Qwen3-0.6B's shape, the reference workload's decode steps: B=16 x ~1600
# tokens best with 4-8 splits, B=32 as fast with 2 as with none, B=48 and up with none); beyond,
# the shorter programs and the combine pass cost more than the balance gains.
_DECODE_PROGRAMS_PER_SM = 4
# Every split keeps at least this many KV tiles at the longest context the block table allows.
_MIN_TILES_PER_SPLIT = 4
_MAX_SPLITS = 16


def select_config(num_tokens: int, num_reqs: int, group: int, max_kv_len: int,
                  num_kv_heads: int, device: torch.device, fp8_cache: bool = False) -> AttentionConfig:
    """Pick the launch configuration from shapes alone (see the module docstring)."""
    min_block_m = triton.next_power_of_2(group)  # every tile holds at least one whole group
    if num_tokens > _DECODE_QUERIES_PER_REQ * num_reqs:
        # One warpgroup on 64 rows: 128 rows per program spill registers at head_dim 128.
        return AttentionConfig(block_m=max(64, min_block_m), block_n=64, num_splits=1,
                               num_warps=4, num_stages=3)
    # An FP8 tile of 128 keys is as many bytes as a 16-bit one of 64: 8% faster at B=256
    # (H200, Llama-3.1-8B heads, 1,024-token contexts).
    block_n = 128 if fp8_cache else 64
    max_programs = _DECODE_PROGRAMS_PER_SM * num_sms(device)
    max_splits = min(_MAX_SPLITS, max(1, triton.cdiv(max_kv_len, block_n * _MIN_TILES_PER_SPLIT)))
    num_splits = 1
    while num_reqs * num_kv_heads * num_splits * 2 <= max_programs and num_splits * 2 <= max_splits:
        num_splits *= 2
    # Double-buffered: 0.3-2% faster than three stages at B=48..256 (H100, the reference workload).
    return AttentionConfig(block_m=max(16, min_block_m), block_n=block_n, num_splits=num_splits,
                           num_warps=4, num_stages=2)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    decode_order: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """decode_order: for a batch of one query per request only, the order in which to start the
    requests' programs (`workers.attention.AttentionMetadata.decode_order`). k_scale, v_scale:
    an FP8 cache's dequantization scales (see `kernels.reference.paged_attention`)."""
    num_tokens, num_heads, _ = query.shape
    num_reqs, num_kv_heads = seq_lens.shape[0], kv_cache.shape[3]
    config = select_config(num_tokens, num_reqs, num_heads // num_kv_heads,
                           block_tables.shape[1] * kv_cache.shape[2], num_kv_heads, query.device,
                           fp8_cache=kv_cache.dtype == torch.float8_e4m3fn)
    return paged_attention_with_config(query, kv_cache, query_start_loc, seq_lens, block_tables,
                                       scale, config, decode_order, k_scale, v_scale)


def paged_attention_with_config(query: torch.Tensor, kv_cache: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                block_tables: torch.Tensor, scale: float,
                                config: AttentionConfig,
                                decode_order: torch.Tensor | None = None, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> torch.Tensor:
    """paged_attention with an explicit configuration (tests cover each path, benchmarks tune)."""
    num_tokens, num_heads, head_dim = query.shape
    num_reqs, num_kv_heads, page_size = seq_lens.shape[0], kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads and config.block_m >= group
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_q = config.block_m // group
    num_splits = config.num_splits
    num_split_rows = num_tokens * num_heads * num_splits
    if num_splits > 1:
        split_acc = torch.empty(num_split_rows * block_d, dtype=torch.float32, device=query.device)
        split_stats = torch.empty(2 * num_split_rows, dtype=torch.float32, device=query.device)
    else:  # unused by the kernel; any tensor fills the argument
        split_acc = split_stats = out
    # An FP8 cache under a 16-bit query: float16 dot operands (e4m3_as_fp16), scaled back here.
    fp8_as_fp16 = kv_cache.dtype == torch.float8_e4m3fn and query.dtype != torch.float32
    if fp8_as_fp16:
        k_scale, v_scale = k_scale * E4M3_AS_FP16_SCALE ** 2, v_scale * E4M3_AS_FP16_SCALE
    if decode_order is not None:
        assert num_tokens == num_reqs, "decode_order is for one query per request"
        grid = (num_kv_heads, num_reqs, num_splits)
    else:
        grid = (num_tokens // block_q + num_reqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        query, kv_cache, out, split_acc, split_stats,
        query_start_loc, seq_lens, block_tables,
        # Without an order the argument is unused: any tensor fills it.
        decode_order if decode_order is not None else seq_lens,
        # The key scale folds into the softmax scale: q . (k * s) = (q . k) * s.
        scale * k_scale * _LOG2E, v_scale, num_reqs, num_heads, num_split_rows,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, PAGE_SIZE=page_size,
        NUM_SPLITS=num_splits, HAS_DECODE_ORDER=decode_order is not None,
        # fp32 models get exact fp32 products, not TF32's 10-bit mantissas; others are unaffected.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        FP8_AS_FP16=fp8_as_fp16, USE_ASM=query.is_cuda,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            split_acc, split_stats, out, num_heads, num_split_rows,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        )
    return out
