"""Quantization kernels against their torch references on a CUDA GPU at real shapes (skipped
without one; FP8 ones without compute capability 8.9):

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_quant_gpu.py -q

Errors are relative, ||out - ref|| / ||ref||, the references run in float32 on the same
quantized operands: what is left is bf16 rounding and summation order.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs FP8 (compute capability 8.9)")
# Llama-3.1-8B's qkv, gate_up and down projections: (N, K)
SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@needs_fp8
@pytest.mark.parametrize("m", [1, 16, 256, 2048])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_linear(m, n, k):
    from kernels import triton_fp8

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    scale = w.abs().amax(1) / 448
    w8 = (w / scale[:, None]).to(torch.float8_e4m3fn)
    for input_scale in (None, torch.tensor([0.02], device="cuda")):
        out = triton_fp8.fp8_linear(x, w8, scale, input_scale)
        assert rel_err(out, reference.fp8_linear(x, w8, scale, input_scale)) < 1e-2


@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("n,k", SHAPES)
def test_w4a16_linear(m, n, k):
    from kernels import triton_w4a16

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), device="cuda", dtype=torch.int32)
    scales = (torch.rand(k // 128, n, device="cuda") * 0.01).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // 128, n), device="cuda").to(torch.bfloat16)
    out = triton_w4a16.w4a16_linear(x, qweight, scales, zeros, 128)
    assert rel_err(out, reference.w4a16_linear(x.float(), qweight, scales, zeros, 128)) < 1e-2


@needs_fp8
def test_fp8_kv_cache_write_and_attention():
    from kernels import triton_ops
    from load_tests.gpu_inputs import QWEN3_HEADS, make_attention_batch

    batch = make_attention_batch([1] * 64 + [300], [1024] * 64 + [200], *QWEN3_HEADS, 16, torch.bfloat16)
    k_scale, v_scale = 0.05, 0.03
    cache8 = torch.stack([reference.quantize_kv(batch.kv_cache[0].nan_to_num(0.0), k_scale, torch.float8_e4m3fn),
                          reference.quantize_kv(batch.kv_cache[1].nan_to_num(0.0), v_scale, torch.float8_e4m3fn)])
    rest = (batch.query_start_loc, batch.seq_lens, batch.block_tables)
    out = triton_ops.paged_attention(batch.query, cache8, *rest, 0.088, None, k_scale, v_scale)
    ref = reference.paged_attention(batch.query.float(), cache8, *rest, 0.088, None, k_scale, v_scale)
    assert rel_err(out, ref) < 1e-2
