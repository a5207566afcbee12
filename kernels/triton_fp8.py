"""FP8 (e4m3) linear layers on the GPU: a Triton kernel quantizes the activations per token,
`torch._scaled_mm` multiplies on the FP8 tensor cores with row-wise scales (one per token, one
per output channel) and writes the model's dtype. Semantics: `kernels.reference.fp8_linear`.

cuBLAS's FP8 GEMM rather than a Triton one: at decode shapes both are bound by reading the
weights, and at prefill shapes cuBLAS is the faster (load_tests/quant_bench.py measures both
paths against bf16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_fp8_per_token(x2, input_scale)
    # weight [N, K] row-major is the column-major [K, N] operand cuBLAS wants.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])
