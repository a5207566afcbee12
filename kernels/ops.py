"""The one dispatch point between Triton kernels and their torch references.

Models call only these functions. On a CUDA tensor with Triton available the Triton kernel
runs; everywhere else (the CPU) the torch reference does, with the same semantics.
"""

from __future__ import annotations

import torch

from kernels import moe_reference, reference


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_kernels() is not None


def _triton_kernels():
    try:
        from kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    decode_order: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """k_scale, v_scale: an FP8 (float8_e4m3fn) cache's per-tensor dequantization scales."""
    args = (query, kv_cache, query_start_loc, seq_lens, block_tables, scale, decode_order, k_scale, v_scale)
    if _use_triton(query):
        return _triton_kernels().paged_attention(*args)
    return reference.paged_attention(*args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _triton_kernels().rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def norm_rope_write_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    args = (query, key, value, positions, cos_sin_cache, kv_cache, slot_mapping, q_norm_weight,
            k_norm_weight, eps, k_scale, v_scale)
    if _use_triton(query):
        return _triton_kernels().norm_rope_write_kv(*args)
    return reference.norm_rope_write_kv(*args)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton_kernels().silu_and_mul(x)
    return reference.silu_and_mul(x)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' feed-forward of each token, weighted by its router weights and summed over
    its top k; see kernels.moe_reference.fused_moe for shapes and semantics."""
    if _use_triton(hidden):
        from kernels.triton_moe import fused_moe as triton_fused_moe
        return triton_fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    return moe_reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    if _use_triton(logits):
        from kernels.triton_sampling import sample_gumbel as triton_sample_gumbel
        return triton_sample_gumbel(logits, temperature, seeds)
    return reference.sample_gumbel(logits, temperature, seeds)


def rejection_sample(draft_token_ids: torch.Tensor, cu_num_draft: torch.Tensor, target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None, bonus_token_ids: torch.Tensor, is_greedy: torch.Tensor,
                     seeds: torch.Tensor, max_num_draft: int) -> torch.Tensor:
    """Speculative decoding's rejection sampler: the tokens each request emits, [B, max_num_draft + 1]
    int64 (accepted drafts, then the recovered or bonus token, then -1); see
    kernels.reference.rejection_sample for the semantics.

    draft_token_ids [T] int64 in [0, V): every request's drafts, concatenated; cu_num_draft [B + 1]
    int32: request b's are draft_token_ids[cu[b]:cu[b + 1]], at most max_num_draft of them (0
    allowed; the kernel checks neither, as that would cost a sync);
    target_probs [T, V] float32: the target's distribution at each draft; draft_probs [T, V]
    float32, the distribution each draft was drawn from, or None for deterministic drafts;
    bonus_token_ids [B] int64: the target's token after the last draft; is_greedy [B] bool;
    seeds [B] int64: each request's random key."""
    num_drafts, num_reqs = len(draft_token_ids), len(bonus_token_ids)
    shapes = {"cu_num_draft": (cu_num_draft.shape, (num_reqs + 1,)),
              "target_probs": (target_probs.shape, (num_drafts, target_probs.shape[-1])),
              "is_greedy": (is_greedy.shape, (num_reqs,)), "seeds": (seeds.shape, (num_reqs,))}
    if draft_probs is not None:
        shapes["draft_probs"] = (draft_probs.shape, target_probs.shape)
    for name, (shape, expected) in shapes.items():
        if tuple(shape) != tuple(expected):
            raise ValueError(f"{name} has shape {tuple(shape)}, expected {tuple(expected)} "
                             f"for {num_drafts} drafts of {num_reqs} requests")
    if num_drafts and max_num_draft < 1:
        raise ValueError(f"max_num_draft={max_num_draft} with {num_drafts} drafts")
    if _use_triton(target_probs):
        from kernels.triton_rejection import rejection_sample as triton_rejection_sample
        return triton_rejection_sample(draft_token_ids, cu_num_draft, target_probs, draft_probs, bonus_token_ids,
                                       is_greedy, seeds, max_num_draft)
    return reference.rejection_sample(draft_token_ids, cu_num_draft, target_probs, draft_probs, bonus_token_ids,
                                      is_greedy, seeds, max_num_draft)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Structured outputs: forbid, in place (-inf), the tokens each masked row's grammar
    refuses; see kernels.reference.apply_token_bitmask. logits [N, V] (contiguous rows);
    bitmask [M, ceil(V / 32)] int32; rows [M] int64."""
    if _use_triton(logits):
        from kernels.triton_bitmask import apply_token_bitmask as triton_apply_token_bitmask
        return triton_apply_token_bitmask(logits, bitmask, rows)
    return reference.apply_token_bitmask(logits, bitmask, rows)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] float8 e4m3 * weight_scale [N])^T with x quantized to e4m3 per
    token (or by the static input_scale); see kernels.reference.fp8_linear."""
    if _use_triton(x):
        from kernels.triton_fp8 import fp8_linear as triton_fp8_linear
        return triton_fp8_linear(x, weight, weight_scale, input_scale)
    return reference.fp8_linear(x, weight, weight_scale, input_scale)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x [M, K] @ the 4-bit weight [K, N] (qweight [K / 8, N] int32, scales and zeros
    [K / group_size, N]); see kernels.reference.w4a16_linear."""
    if _use_triton(x):
        from kernels.triton_w4a16 import w4a16_linear as triton_w4a16_linear
        return triton_w4a16_linear(x, qweight, scales, zeros, group_size)
    return reference.w4a16_linear(x, qweight, scales, zeros, group_size)
