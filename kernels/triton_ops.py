"""Triton kernels, one per function of `kernels.reference` and with the same signatures;
`kernels.ops` calls them on CUDA tensors. The paged KV cache kernels live in
`kernels.triton_attention`; the per-token layers (norm, rotary embedding, activation) here.

Inputs may be strided views (the q/k/v and gate/up slices of fused projections): each kernel
takes row strides and needs only a unit stride along the last dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_attention import paged_attention, write_kv_cache

__all__ = ["paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache"]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, last]: a view for 2-D and 3-D tensors (strided or not), so one
    kernel handles hidden states [T, hidden] and per-head slices [T, heads, head_dim]."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@triton.jit
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
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin, offs,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & (offs < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rotary_embedding_kernel(positions_ptr, query_ptr, key_ptr, cos_sin_ptr,
                             stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos_sin,
                             num_q_heads, num_k_heads,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    """One token: all its query and key heads share one cos/sin row."""
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(cos_sin_row + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    _rotate_heads(query_ptr + token * stride_q_t, stride_q_h, num_q_heads, cos, sin, offs,
                  HALF=HALF, BLOCK_H=BLOCK_HQ)
    _rotate_heads(key_ptr + token * stride_k_t, stride_k_h, num_k_heads, cos, sin, offs,
                  HALF=HALF, BLOCK_H=BLOCK_HK)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    num_tokens, num_q_heads, _ = query.shape
    num_k_heads = key.shape[1]
    if num_tokens == 0:
        return
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert positions.is_contiguous()
    half = cos_sin_cache.shape[-1] // 2
    _rotary_embedding_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_k_heads),
    )


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
