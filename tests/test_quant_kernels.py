"""Quantization kernels on the CPU: the torch references pinned against the formats' formulas
here, and the Triton kernels against the references under the Triton interpreter (one
subprocess, as in tests/test_kernels.py).

- FP8 KV cache: the cache write quantizes (x / scale, saturated, round to nearest even) and
  paged attention reads float8 e4m3 back times the per-tensor scales.
- FP8 linear: per-token activation quantization (the GEMM itself is cuBLAS's, tests/gpu), and
  the weight-only kernel of decode batches.
- W4A16: the GEMM dequantizing packed int4 tiles in registers, every configuration path.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from kernels import reference
from test_kernels import MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, make_attention_batch, rope_cos_sin_cache
from triton_interpreter import interpreter_tests, run_cases

FP8 = torch.float8_e4m3fn


def fp8_cache(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    """A float cache's keys and values as an FP8 cache with these scales (NaN slots stay NaN)."""
    return torch.stack([reference.quantize_kv(kv_cache[0], k_scale, FP8),
                        reference.quantize_kv(kv_cache[1], v_scale, FP8)])


# ------------------------------------------------------------------ the references, pinned

def test_quantize_kv_saturates_and_rounds_to_nearest() -> None:
    x = torch.tensor([1000.0, -1000.0, 448.0, 1.0625, 0.3, -2.5])
    q = reference.quantize_kv(x, 2.0, FP8).float()
    # e4m3 near 0.5 steps by 1/16: 0.53125 rounds to even 0.5; 500 saturates to 448.
    assert q.tolist() == [448.0, -448.0, 224.0, 0.5, 0.15625, -1.25]


def test_reference_attention_over_fp8_cache_matches_dequantized_cache() -> None:
    k_scale, v_scale = 0.05, 0.02
    batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 4, 2, 32, 16)
    cache8 = fp8_cache(batch.kv_cache.nan_to_num(0.0), k_scale, v_scale)
    dequantized = torch.stack([cache8[0].float() * k_scale, cache8[1].float() * v_scale])
    args = (batch.query, cache8, *batch.args()[2:])
    out = reference.paged_attention(*args, 0.17, None, k_scale, v_scale)
    expected = reference.paged_attention(batch.query, dequantized, *batch.args()[2:], 0.17)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # And it is close to attention over the unquantized cache (e4m3 keeps 3 mantissa bits).
    exact = reference.paged_attention(*batch.clean_args(), 0.17)
    assert (out - exact).abs().max() < 0.1


def test_reference_write_kv_cache_fp8_divides_by_the_scales() -> None:
    cache = torch.zeros(2, 2, 4, 1, 8, dtype=FP8)
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    reference.write_kv_cache(key, value, cache, torch.tensor([5, -1, 2]), k_scale=0.5, v_scale=4.0)
    flat = cache.view(2, 8, 1, 8).float()
    torch.testing.assert_close(flat[0, 5], (key[0] / 0.5).to(FP8).float())
    torch.testing.assert_close(flat[1, 2], (value[2] / 4.0).to(FP8).float())
    assert flat[:, [0, 1, 3, 4, 6, 7]].abs().sum() == 0


# ------------------------------------------------------------------ Triton under the interpreter

def assert_fp8_equal_but_interpreter_carry(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal, except where the interpreter's float32 -> e4m3 cast loses the carry of a mantissa
    that rounds up into the next power of two (triton 3.x: 127.4 becomes 64, not 128), which
    the GPU's conversion does not do, and a rare value one e4m3 step off (subnormals, 2^-9
    apart, included), which its rounding of subnormals and of inputs computed in another order
    can give."""
    out, expected = out.float(), expected.float()
    wrong = out != expected
    lost_carry = (out * 2 == expected) & (expected.abs().log2() == expected.abs().log2().round())
    one_step = (out - expected).abs() <= torch.maximum(expected.abs() / 8, torch.tensor(2.0 ** -9))
    assert bool((lost_carry | one_step | ~wrong).all()), f"{int((wrong & ~lost_carry).sum())} values differ"
    assert int((wrong & ~lost_carry).sum()) <= out.numel() // 20


def _case_attention_fp8_cache() -> None:
    from kernels import triton_ops
    from kernels.triton_attention import AttentionConfig, paged_attention_with_config

    k_scale, v_scale = 0.03, 0.02
    for num_heads, num_kv_heads, head_dim in ((4, 2, 64), (8, 1, 32)):
        batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, num_heads, num_kv_heads, head_dim, 16)
        cache8 = fp8_cache(batch.kv_cache, k_scale, v_scale)
        clean8 = fp8_cache(batch.kv_cache.nan_to_num(0.0), k_scale, v_scale)
        rest = batch.args()[2:]
        expected = reference.paged_attention(batch.query, clean8, *rest, 0.125, None, k_scale, v_scale)
        outs = {"auto": triton_ops.paged_attention(batch.query, cache8, *rest, 0.125, None, k_scale, v_scale)}
        for block_m, block_n, splits in [(16, 32, 1), (16, 16, 4), (64, 32, 1)]:
            config = AttentionConfig(max(block_m, num_heads // num_kv_heads), block_n, splits, 4, 2)
            outs[str(config)] = paged_attention_with_config(batch.query, cache8, *rest, 0.125, config, None,
                                                            k_scale, v_scale)
        for name, out in outs.items():
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
        # A 16-bit query takes the float16 path (the cache widened by e4m3_as_fp16, scales x 2^8).
        query16 = batch.query.nan_to_num(0.0).half()
        expected16 = reference.paged_attention(query16.float(), clean8, *rest, 0.125, None, k_scale, v_scale)
        out16 = triton_ops.paged_attention(query16, cache8, *rest, 0.125, None, k_scale, v_scale)
        torch.testing.assert_close(out16.float(), expected16, atol=2e-3, rtol=2e-3)


def _case_norm_rope_write_kv_fp8_cache() -> None:
    from kernels import triton_ops

    num_heads, num_kv_heads, head_dim = 4, 2, 64
    cos_sin = rope_cos_sin_cache(100, head_dim)
    positions = torch.tensor([0, 1, 99, 42])
    slot_mapping = torch.tensor([17, -1, 0, 31])
    q = torch.randn(4, num_heads, head_dim)
    # Large keys: some saturate at the scale 0.01 (|k| / 0.01 > 448).
    k, v = 3 * torch.randn(4, num_kv_heads, head_dim), torch.randn(4, num_kv_heads, head_dim)
    for norm_args in ((), (torch.randn(head_dim), torch.randn(head_dim), 1e-6)):
        expected_cache = torch.zeros(2, 3, 16, num_kv_heads, head_dim, dtype=FP8)
        kv_cache = expected_cache.clone()
        expected = reference.norm_rope_write_kv(q, k, v, positions, cos_sin, expected_cache, slot_mapping,
                                                *norm_args, k_scale=0.01, v_scale=0.5)
        out = triton_ops.norm_rope_write_kv(q, k, v, positions, cos_sin, kv_cache, slot_mapping,
                                            *norm_args, k_scale=0.01, v_scale=0.5)
        torch.testing.assert_close(out, expected)
        assert_fp8_equal_but_interpreter_carry(kv_cache, expected_cache)


def test_reference_fp8_linear_is_the_scaled_fp8_product() -> None:
    x, w = torch.randn(reference.WEIGHT_ONLY_MAX_ROWS + 1, 64), torch.randn(32, 64)
    w_scale = w.abs().amax(1) / 448
    wq = (w / w_scale[:, None]).to(FP8)
    x_scale = x.abs().amax(1, keepdim=True) / 448
    expected = ((x / x_scale).to(FP8).float() @ wq.float().T) * x_scale * w_scale
    torch.testing.assert_close(reference.fp8_linear(x, wq, w_scale), expected)
    assert (reference.fp8_linear(x, wq, w_scale) - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()
    static = reference.fp8_linear(x, wq, w_scale, torch.tensor([0.01]))
    torch.testing.assert_close(static, ((x / 0.01).clamp(-448, 448).to(FP8).float() @ wq.float().T) * 0.01 * w_scale)


def test_reference_fp8_linear_keeps_a_decode_batch_unquantized() -> None:
    x, w = torch.randn(reference.WEIGHT_ONLY_MAX_ROWS, 64), torch.randn(32, 64)
    w_scale = w.abs().amax(1) / 448
    wq = (w / w_scale[:, None]).to(FP8)
    expected = x @ (wq.float() * w_scale[:, None]).T
    torch.testing.assert_close(reference.fp8_linear(x, wq, w_scale), expected)
    torch.testing.assert_close(reference.fp8_linear(x, wq, w_scale, torch.tensor([0.01])), expected)
    # One row more and the activations are quantized too: the two differ.
    x_more = torch.cat([x, x[:1]])
    assert not torch.allclose(reference.fp8_linear(x_more, wq, w_scale)[:-1], expected, atol=1e-4)


def test_reference_w4a16_linear_dequantizes_groups() -> None:
    from load_tests.quant_checkpoints import pack_gptq_rows

    k, n, group = 64, 24, 16
    q = torch.randint(0, 16, (k, n))
    zeros, scales = torch.randint(0, 16, (k // group, n)).float(), torch.rand(k // group, n)
    x = torch.randn(3, k)
    weight = torch.stack([(q[i] - zeros[i // group]) * scales[i // group] for i in range(k)])
    out = reference.w4a16_linear(x, pack_gptq_rows(q), scales, zeros, group)
    torch.testing.assert_close(out, x @ weight)


def _w4a16_inputs(m: int, k: int, n: int, group: int, dtype: torch.dtype) -> tuple:
    from load_tests.quant_checkpoints import pack_gptq_rows

    q = torch.randint(0, 16, (k, n))
    zeros = torch.randint(0, 16, (k // group, n)).to(dtype)
    scales = (torch.rand(k // group, n) * 0.02).to(dtype)
    return torch.randn(m, k).to(dtype), pack_gptq_rows(q), scales, zeros, group


def _case_w4a16_linear() -> None:
    from kernels.triton_w4a16 import W4A16Config, w4a16_linear, w4a16_linear_with_config

    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for m, k, n, group in ((1, 256, 96, 64), (5, 128, 72, 32), (33, 256, 64, 128)):
            args = _w4a16_inputs(m, k, n, group, dtype)
            expected = reference.w4a16_linear(*args)
            outs = {"auto": w4a16_linear(*args)}
            for config in (W4A16Config(16, 32, 32, 1, 4, 2), W4A16Config(16, 64, 16, 3, 4, 2),
                           W4A16Config(64, 32, 32, 2, 4, 2)):
                outs[str(config)] = w4a16_linear_with_config(*args, config)
            for name, out in outs.items():
                torch.testing.assert_close(out, expected, atol=tol, rtol=tol, msg=lambda msg: f"{name}: {msg}")


def _case_quantize_fp8_per_token() -> None:
    from kernels.triton_fp8 import quantize_fp8_per_token

    x = torch.randn(7, 200) * torch.logspace(-3, 2, 7)[:, None]
    for input_scale in (None, torch.tensor([0.05])):
        out, scale = quantize_fp8_per_token(x, input_scale)
        expected, expected_scale = reference.quantize_fp8_per_token(x, input_scale)
        torch.testing.assert_close(scale, expected_scale)
        assert_fp8_equal_but_interpreter_carry(out, expected)


def _case_fp8_weight_only_linear() -> None:
    from kernels.triton_fp8 import WeightOnlyConfig, fp8_weight_only_linear

    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for m, n, k in ((1, 96, 256), (5, 72, 200), (16, 40, 64)):  # ragged N and K tiles too
            w = torch.randn(n, k)
            scale = w.abs().amax(1) / 448
            wq = (w / scale[:, None]).to(FP8)
            x = torch.randn(m, k).to(dtype)
            expected = reference.fp8_linear(x, wq, scale)
            for config in (None, WeightOnlyConfig(16, 64, 4, 2), WeightOnlyConfig(32, 128, 4, 3)):
                out = fp8_weight_only_linear(x, wq, scale, config)
                torch.testing.assert_close(out, expected, atol=tol, rtol=tol, msg=lambda msg: f"{config}: {msg}")


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "fp8_weight_only_linear": _case_fp8_weight_only_linear,
    "attention_fp8_cache": _case_attention_fp8_cache,
    "norm_rope_write_kv_fp8_cache": _case_norm_rope_write_kv_fp8_cache,
    "w4a16_linear": _case_w4a16_linear,
    "quantize_fp8_per_token": _case_quantize_fp8_per_token,
}

interpreter_results, test_triton_kernel_matches_reference = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])
