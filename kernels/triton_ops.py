"""Triton kernels, one per function of `kernels.reference` and with the same signatures;
`kernels.ops` calls them on CUDA tensors. Paged attention lives in `kernels.triton_attention`;
the per-token layers (norm; q/k norm, rotary embedding and KV-cache write; activation) here.

Inputs may be strided views (the q/k/v and gate/up slices of fused projections): each kernel
takes row strides and needs only a unit stride along the last dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_attention import paged_attention

__all__ = ["norm_rope_write_kv", "paged_attention", "rms_norm", "silu_and_mul"]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, last]: a view for 2-D and 3-D tensors (strided or not), so one
    kernel handles hidden states [T, hidden] and per-head slices [T, heads, head_dim]."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@triton.jit(do_not_specialize=["num_rows"])  # the step's token count (see triton_attention.py)
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, eps,
                     num_rows, inner_rows, stride_x_outer, stride_x_inner,
                     stride_res_outer, stride_res_inner,
                     N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    outer = (rows // inner_rows).to(tl.int64)
    inner = rows % inner_rows
    x = tl.load(x_ptr + (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :],
                mask=mask, other=0.0)
    # Outputs are fresh contiguous tensors.
    dense_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + (outer * stride_res_outer + inner * stride_res_inner)[:, None]
                           + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the input dtype before normalizing, as the reference's `x + residual`.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + dense_offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 1) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    out = x32 * inv_rms[:, None] * weight[None, :]
    tl.store(out_ptr + dense_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x3 = _as_3d(x)
    res3 = _as_3d(residual) if residual is not None else x3
    assert x3.stride(-1) == 1 and res3.stride(-1) == 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else x
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows == 0:
        return out, new_residual
    block_n = triton.next_power_of_2(n)
    # Several short rows (per-head q/k norms) per program, so each program moves a few KiB.
    block_r = max(1, 2048 // block_n)
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x3, res3, weight, out, new_residual, eps,
        num_rows, x3.shape[1], x3.stride(0), x3.stride(1), res3.stride(0), res3.stride(1),
        N=n, BLOCK_R=block_r, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        num_warps=min(8, max(1, block_r * block_n // 512)),
    )
    return out, new_residual


@triton.jit
def _norm_rope_heads(x_ptr, stride_h, num_heads, norm_weight_ptr, eps, cos, sin, offs,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr):
    """One token's heads [BLOCK_H, head_dim] as their two rotated halves in float32 (and the
    mask of real elements), normalized per head first with HAS_NORM."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & (offs < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(norm_weight_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        # Rounded to the model's dtype between norm and rotation, as the reference's two steps.
        x1 = (x1 * inv_rms[:, None] * w1[None, :]).to(dtype).to(tl.float32)
        x2 = (x2 * inv_rms[:, None] * w2[None, :]).to(dtype).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :], mask


@triton.jit
def _to_fp8_range(x, inv_scale):
    """x / scale in float32, saturated to e4m3's finite range (it has no infinity)."""
    return tl.clamp(x.to(tl.float32) * inv_scale, -448.0, 448.0)


@triton.jit
def _norm_rope_write_kv_kernel(
    positions_ptr, query_ptr, key_ptr, value_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr,
    query_out_ptr, cache_ptr, slot_mapping_ptr, eps, k_inv_scale, v_inv_scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cos_sin,
    stride_cache_kv, stride_cache_block, stride_cache_slot, stride_cache_h,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HAS_NORM: tl.constexpr, FP8_CACHE: tl.constexpr,
):
    """One token: its query and key heads share one cos/sin row, its keys and values one slot.
    An FP8 cache stores key * k_inv_scale and value * v_inv_scale, saturated to +-448."""
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(cos_sin_row + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)

    q1, q2, q_mask = _norm_rope_heads(query_ptr + token * stride_q_t, stride_q_h, num_q_heads,
                                      q_norm_ptr, eps, cos, sin, offs,
                                      HALF=HALF, BLOCK_H=BLOCK_HQ, HAS_NORM=HAS_NORM)
    q_heads = tl.arange(0, BLOCK_HQ)
    q_out = query_out_ptr + (token * num_q_heads + q_heads[:, None]) * (2 * HALF) + offs[None, :]
    out_dtype = query_out_ptr.dtype.element_ty
    tl.store(q_out, q1.to(out_dtype), mask=q_mask)
    tl.store(q_out + HALF, q2.to(out_dtype), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # -1: a padding token, whose keys and values go nowhere
        k1, k2, kv_mask = _norm_rope_heads(key_ptr + token * stride_k_t, stride_k_h, num_kv_heads,
                                           k_norm_ptr, eps, cos, sin, offs,
                                           HALF=HALF, BLOCK_H=BLOCK_HK, HAS_NORM=HAS_NORM)
        kv_heads = tl.arange(0, BLOCK_HK)
        k_dst = (cache_ptr + (slot // PAGE_SIZE) * stride_cache_block
                 + (slot % PAGE_SIZE) * stride_cache_slot + kv_heads[:, None] * stride_cache_h + offs[None, :])
        v_src = value_ptr + token * stride_v_t + kv_heads[:, None] * stride_v_h + offs[None, :]
        v1 = tl.load(v_src, mask=kv_mask)
        v2 = tl.load(v_src + HALF, mask=kv_mask)
        if FP8_CACHE:
            k1, k2 = _to_fp8_range(k1, k_inv_scale), _to_fp8_range(k2, k_inv_scale)
            v1, v2 = _to_fp8_range(v1, v_inv_scale), _to_fp8_range(v2, v_inv_scale)
        cache_dtype = cache_ptr.dtype.element_ty
        tl.store(k_dst, k1.to(cache_dtype), mask=kv_mask)
        tl.store(k_dst + HALF, k2.to(cache_dtype), mask=kv_mask)
        v_dst = k_dst + stride_cache_kv
        tl.store(v_dst, v1.to(cache_dtype), mask=kv_mask)
        tl.store(v_dst + HALF, v2.to(cache_dtype), mask=kv_mask)


def norm_rope_write_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One launch for what ran as four (q norm, k norm, rotary embedding, cache write): at decode
    batch sizes each was a few microseconds of launch and latency, on every layer."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    assert 2 * half == head_dim, "the rotary embedding covers whole heads"
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    assert kv_cache.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1 and positions.is_contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    has_norm = q_norm_weight is not None
    _norm_rope_write_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache,
        # Without norms the weight arguments are unused: any tensor fills them.
        q_norm_weight if has_norm else query, k_norm_weight if has_norm else key,
        out, kv_cache, slot_mapping, eps, 1.0 / k_scale, 1.0 / v_scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_q_heads, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        PAGE_SIZE=kv_cache.shape[2], HAS_NORM=has_norm, FP8_CACHE=kv_cache.dtype == torch.float8_e4m3fn,
    )
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), d, BLOCK=block)
    return out
