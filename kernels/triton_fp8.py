"""FP8 (e4m3) linear layers on the GPU. Semantics: `kernels.reference.fp8_linear`.

- More than WEIGHT_ONLY_MAX_ROWS rows: a Triton kernel quantizes the activations per token,
  `torch._scaled_mm` multiplies on the FP8 tensor cores with row-wise scales (one per token,
  one per output channel) and writes the model's dtype. cuBLAS's FP8 GEMM is the faster there.
- Up to WEIGHT_ONLY_MAX_ROWS rows (decode): the step only reads weights, and cuBLAS's FP8
  tiles (128 rows of M) plus a quantization launch per layer made FP8 slower than bf16 at
  batch 1 (docs/benchmarks.md). A Triton kernel reads the FP8 weight tile by tile, widens it
  in registers and multiplies the unquantized activations: half bf16's bytes, one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference import WEIGHT_ONLY_MAX_ROWS
from kernels.triton_device import num_sms
from kernels.triton_e4m3 import e4m3_as_fp16

_FP8_MAX = tl.constexpr(448.0)  # a constexpr: the only kind of global a kernel may read


@triton.jit
def _quantize_per_token_kernel(x_ptr, out_ptr, scale_ptr, static_scale_ptr, stride_x, K,
                               BLOCK_K: tl.constexpr, STATIC: tl.constexpr):
    """One row: its scale (amax / 448, or the static one) and the row divided by it, saturated."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / _FP8_MAX
    q = tl.clamp(x / scale, -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + row * K + cols, q.to(out_ptr.dtype.element_ty), mask=cols < K)
    tl.store(scale_ptr + row, scale)


def quantize_fp8_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """As kernels.reference.quantize_fp8_per_token."""
    num_rows, k = x.shape
    assert x.stride(-1) == 1
    out = torch.empty((num_rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    if num_rows:
        _quantize_per_token_kernel[(num_rows,)](
            x, out, scale, input_scale if input_scale is not None else scale, x.stride(0), k,
            BLOCK_K=triton.next_power_of_2(k), STATIC=input_scale is not None,
            num_warps=min(16, max(1, triton.next_power_of_2(k) // 512)))
    return out, scale


@triton.jit
def _fp8_weight_only_kernel(a_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_am, stride_wn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            FP16_DOT: tl.constexpr, USE_ASM: tl.constexpr):
    """Program n: out[:, n * BLOCK_N, +BLOCK_N) = a @ (w * scale)^T over all of K, for the
    M <= BLOCK_M rows of a. w [N, K] is read along K, its contiguous dimension.

    FP16_DOT (16-bit activations): float16 operands, w by e4m3_as_fp16 and a scaled by 2^-8 so
    that no bf16 activation overflows float16; `scale` carries both 2^8. Otherwise (float32)
    w is widened to float32 and the product is exact."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    a_rows = a_ptr + offs_m[:, None] * stride_am
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if FP16_DOT:
            a16 = (a.to(tl.float32) * (1.0 / 256.0)).to(tl.float16)
            acc += tl.dot(a16, tl.trans(e4m3_as_fp16(w, USE_ASM)))
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if FP16_DOT:
        scale = scale * (256.0 * 256.0)  # a's 2^-8 and E4M3_AS_FP16_SCALE
    out = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class WeightOnlyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def select_weight_only_config(n: int, k: int, device: torch.device) -> WeightOnlyConfig:
    """From shapes alone (no host sync, CUDA-graph safe). No split of K, which would cost a
    reduction launch per layer. Swept on the H200 at M = 1 and 16 over the Qwen3-0.6B and
    Llama-3.1-8B layers (16-64 columns, 256-512-wide K tiles, 4-8 warps, 3-4 stages): 64
    columns a program were fastest while that still gave most multiprocessors a program
    (N >= 6144), 32 below; 512-wide K tiles, 4 warps."""
    block_n = 64 if triton.cdiv(n, 64) >= 0.7 * num_sms(device) else 32
    return WeightOnlyConfig(block_n, min(512, triton.next_power_of_2(k)), num_warps=4, num_stages=3)


def fp8_weight_only_linear(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           config: WeightOnlyConfig | None = None) -> torch.Tensor:
    """x2 [M <= WEIGHT_ONLY_MAX_ROWS, K] @ (weight [N, K] e4m3 * weight_scale [N])^T."""
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= WEIGHT_ONLY_MAX_ROWS and x2.stride(-1) == 1 and weight.is_contiguous()
    config = config or select_weight_only_config(n, k, x2.device)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m:
        _fp8_weight_only_kernel[(triton.cdiv(n, config.block_n),)](
            x2, weight, weight_scale, out, m, n, k, x2.stride(0), weight.stride(0),
            BLOCK_M=WEIGHT_ONLY_MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            FP16_DOT=x2.dtype != torch.float32, USE_ASM=x2.is_cuda,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= WEIGHT_ONLY_MAX_ROWS:
        return fp8_weight_only_linear(x2, weight, weight_scale).view(*x.shape[:-1], weight.shape[0])
    xq, x_scale = quantize_fp8_per_token(x2, input_scale)
    # weight [N, K] row-major is the column-major [K, N] operand cuBLAS wants.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])
