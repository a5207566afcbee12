"""4-bit weights, 16-bit activations (AWQ and GPTQ checkpoints): one Triton GEMM that reads
the packed int4 weight tile by tile and dequantizes it in registers, (q - zero) * scale per
group of input rows, before the tensor-core dot. Semantics: `kernels.reference.w4a16_linear`.

At decode (a few rows) the step is bound by reading the weights, a quarter of bf16's bytes:
the K dimension is split over programs (split-K) so that even a narrow layer keeps every SM
reading, and a second pass sums the splits' float32 partials."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_device import num_sms


@triton.jit
def _w4a16_kernel(a_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
                  M, N, K, stride_am, stride_qk, stride_sg, tiles_per_split,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (m, n, split): rows [m * BLOCK_M, +BLOCK_M) x columns [n * BLOCK_N, +BLOCK_N)
    over the split's K tiles, into out[split] (float32 partials)."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, K // BLOCK_K)
    for tile in range(tile_lo, tile_hi):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :],
                    mask=m_mask[:, None], other=0.0)
        # Each int32 holds 8 consecutive rows: 8 lanes load it, each shifts out its nibble.
        packed = tl.load(qweight_ptr + (offs_k // 8).to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                         mask=n_mask[None, :], other=0)
        q = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF
        group = (tile * BLOCK_K) // GROUP  # BLOCK_K divides GROUP: one group per tile
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - zero[None, :]) * scale[None, :]).to(a.dtype)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    out = out_ptr + split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class W4A16Config:
    block_m: int
    block_n: int
    block_k: int  # divides the group size
    split_k: int
    num_warps: int
    num_stages: int


def select_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> W4A16Config:
    """From shapes alone (no host sync, CUDA-graph safe)."""
    block_k = min(64, group_size)
    if m <= 16:
        block_n = 64
        programs = triton.cdiv(n, block_n)
        num_tiles = k // block_k
        # About two programs per SM, each keeping at least four K tiles.
        split_k = max(1, min(num_tiles // 4, 2 * num_sms(device) // programs))
        return W4A16Config(16, block_n, block_k, split_k, num_warps=4, num_stages=4)
    if m <= 64:
        return W4A16Config(64, 64, block_k, 1, num_warps=4, num_stages=3)
    return W4A16Config(128, 128, block_k, 1, num_warps=8, num_stages=3)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    k, n = x.shape[-1], qweight.shape[1]
    config = select_config(x.numel() // k, n, k, group_size, x.device)
    return w4a16_linear_with_config(x, qweight, scales, zeros, group_size, config)


def w4a16_linear_with_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor, group_size: int, config: W4A16Config) -> torch.Tensor:
    """w4a16_linear with an explicit configuration (tests cover each path, benchmarks tune)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = qweight.shape[1]
    assert x2.stride(-1) == 1 and qweight.is_contiguous() and scales.stride() == zeros.stride()
    assert k % config.block_k == 0 and group_size % config.block_k == 0
    num_tiles = k // config.block_k
    split_k = min(config.split_k, num_tiles)
    tiles_per_split = triton.cdiv(num_tiles, split_k)
    split_k = triton.cdiv(num_tiles, tiles_per_split)  # no split left without tiles
    out_dtype = x.dtype if split_k == 1 else torch.float32
    out = torch.empty((split_k, m, n), dtype=out_dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
        _w4a16_kernel[grid](
            x2, qweight, scales, zeros, out, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0),
            tiles_per_split, GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config.num_warps, num_stages=config.num_stages)
    y = out[0] if split_k == 1 else out.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], n)
