"""Triton kernels against the torch references on a CUDA GPU, at real model shapes (skipped
without one). On the GPU machine:

    PYTHONPATH=$PWD python -m pytest tests/gpu -q

The attention timings are `python -m load_tests.attention_bench`, on the same inputs
(load_tests/gpu_inputs.py).

Attention is checked against the reference run in float32 on upcast inputs, by the relative
error ||out - ref|| / ||ref||: bf16 operands land between 1e-3 and 1e-2. Outputs come from
memory the caching allocator had filled with NaN, so an element the kernel never wrote shows.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
import torch

from kernels import reference
from load_tests.gpu_inputs import QWEN3_HEADS, AttentionBatch, make_attention_batch

if TYPE_CHECKING:
    from kernels.triton_attention import AttentionConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def poison_allocator() -> None:
    """Fill free memory of the caching allocator's pools (large blocks, and the small-block pool
    of allocations under 1 MiB) with NaN, so the kernels' outputs (torch.empty) start as NaN."""
    large = torch.empty(256 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    small = [torch.empty(64 << 10, dtype=torch.float32, device="cuda").fill_(float("nan")) for _ in range(64)]
    del large, small


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_attention(batch: AttentionBatch, scale: float) -> torch.Tensor:
    """The reference in float32 on upcast inputs, the stale (NaN) cache slots zeroed: the
    kernel's reads are under test, not the reference's. It runs on the CPU: its causal mask is
    built there whatever the inputs' device."""
    query, kv_cache, query_start_loc, seq_lens, block_tables = (t.cpu() for t in batch.args())
    return reference.paged_attention(query.float(), kv_cache.float().nan_to_num(0.0), query_start_loc,
                                     seq_lens, block_tables, scale).cuda()


def check_attention(batch: AttentionBatch, scale: float,
                    forced_configs: tuple[AttentionConfig, ...] = (),
                    decode_order: torch.Tensor | None = None) -> None:
    """The public kernel (its own configuration), then each of `forced_configs`."""
    from kernels import triton_ops
    from kernels.triton_attention import paged_attention_with_config

    expected = reference_attention(batch, scale)
    for config in (None, *forced_configs):
        poison_allocator()
        if config is None:
            out = triton_ops.paged_attention(*batch.args(), scale, decode_order)
        else:
            out = paged_attention_with_config(*batch.args(), scale, config, decode_order)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"{config}: an output element never written (or NaN leaked in)"
        error = relative_error(out, expected)
        assert error < REL_TOL[batch.query.dtype], f"{config}: {error}"


def mixed_batch_lens(rng: random.Random) -> tuple[list[int], list[int]]:
    """A serving step: a prefill from scratch, chunks over cached prefixes, decodes of varied
    lengths, requests with no queries, speculative verifications of 4 tokens."""
    query_lens = [700, 300, 64] + [1] * 40 + [0] * 3 + [4] * 5
    context_lens = [0, 1500, 17] + [rng.randint(0, 2000) for _ in range(48)]
    order = list(range(len(query_lens)))
    rng.shuffle(order)
    return [query_lens[i] for i in order], [context_lens[i] for i in order]


@pytest.mark.parametrize("heads", [QWEN3_HEADS, (32, 8, 128), (12, 12, 64), (32, 4, 128), (14, 2, 64)],
                         ids=["qwen3-g2", "g4", "g1-d64", "g8", "g7-d64"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_mixed_batch(heads: tuple[int, int, int], block_size: int) -> None:
    from kernels.triton_attention import AttentionConfig

    query_lens, context_lens = mixed_batch_lens(random.Random(block_size + heads[0]))
    batch = make_attention_batch(query_lens, context_lens, *heads, block_size, torch.bfloat16)
    # Also through the decode path: small query tiles, KV split in 4.
    check_attention(batch, heads[2] ** -0.5, (AttentionConfig(16, 64, 4, num_warps=4, num_stages=3),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged_attention_dtypes(dtype: torch.dtype) -> None:
    query_lens, context_lens = mixed_batch_lens(random.Random(1))
    check_attention(make_attention_batch(query_lens, context_lens, *QWEN3_HEADS, 16, dtype), 0.088)


@pytest.mark.parametrize("num_reqs", [1, 7, 64, 256])
def test_paged_attention_decode(num_reqs: int) -> None:
    # Decode-only batches: small ones take the split (flash-decoding) path.
    rng = random.Random(num_reqs)
    context_lens = [rng.randint(0, 2047) for _ in range(num_reqs)]
    batch = make_attention_batch([1] * num_reqs, context_lens, *QWEN3_HEADS, 16, torch.bfloat16)
    check_attention(batch, 0.088)
    # Longest first, as the CUDA graphs start them.
    check_attention(batch, 0.088, decode_order=torch.argsort(batch.seq_lens, descending=True))


def test_paged_attention_in_cuda_graph() -> None:
    """Captured once, replayed after the step's tensors change in place: the kernels' launch
    must not depend on tensor values (no host sync, no value-dependent grid)."""
    from kernels import triton_ops

    rng = random.Random(0)
    num_reqs, scale = 8, 0.088  # few enough requests for the split path
    context_lens = [rng.randint(1, 1500) for _ in range(num_reqs)]
    batch = make_attention_batch([1] * num_reqs, context_lens, *QWEN3_HEADS, 16, torch.bfloat16,
                                 spare_blocks_per_req=40, poison=False)

    def attend() -> torch.Tensor:  # longest first, sorted in the graph as the CUDA graphs' are
        return triton_ops.paged_attention(*batch.args(), scale,
                                          torch.argsort(batch.seq_lens, descending=True))

    attend()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend()
    for step in range(3):
        # Within the 40 spare blocks; the longest-first order changes between replays.
        batch.seq_lens.add_(torch.randint(1, 200, (num_reqs,), dtype=torch.int32, device="cuda"))
        batch.query.normal_()
        graph.replay()
        expected = reference_attention(batch, scale)
        assert relative_error(out, expected) < REL_TOL[torch.bfloat16], step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm(dtype: torch.dtype) -> None:
    from kernels import triton_ops

    hidden = 1024
    x = torch.randn(333, hidden, device="cuda").to(dtype)
    residual = torch.randn(333, hidden, device="cuda").to(dtype)
    weight = torch.randn(hidden, device="cuda").to(dtype)
    for res in (None, residual):
        poison_allocator()
        out, new_residual = triton_ops.rms_norm(x, weight, 1e-6, res)
        expected, expected_residual = reference.rms_norm(x, weight, 1e-6, res)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    # Qwen3's per-head q norm over the strided query slice of the fused projection.
    qkv = torch.randn(333, 32 * 128, device="cuda").to(dtype)
    q = qkv[:, :16 * 128].view(333, 16, 128)
    out, _ = triton_ops.rms_norm(q, weight[:128], 1e-6)
    torch.testing.assert_close(out, reference.rms_norm(q, weight[:128], 1e-6)[0])


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_norm_rope_write_kv(qk_norm: bool) -> None:
    from kernels import triton_ops

    num_tokens, (num_heads, num_kv_heads, head_dim) = 333, QWEN3_HEADS
    inv_freq = 1e6 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(4096, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), -1).float().cuda()
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    slot_mapping = torch.randperm(64 * 16, device="cuda")[:num_tokens]
    slot_mapping[::7] = -1
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").bfloat16()
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    args = (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim), positions, cos_sin_cache)
    norm_args = (torch.randn(head_dim, device="cuda").bfloat16(), torch.randn(head_dim, device="cuda").bfloat16(),
                 1e-6) if qk_norm else ()
    expected_cache = torch.randn(2, 64, 16, num_kv_heads, head_dim, device="cuda").bfloat16()
    kv_cache = expected_cache.clone()
    poison_allocator()
    out = triton_ops.norm_rope_write_kv(*args, kv_cache, slot_mapping, *norm_args)
    expected = reference.norm_rope_write_kv(*args, expected_cache, slot_mapping, *norm_args)
    # The kernel sums each head's squares in two halves: a normalized value on a bfloat16
    # rounding boundary may round the other way before the rotation, one ulp (2^-7 at 1).
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(kv_cache, expected_cache, atol=1e-2, rtol=1.6e-2)


def test_silu_and_mul() -> None:
    from kernels import triton_ops

    x = torch.randn(333, 2 * 3072, device="cuda").bfloat16()
    poison_allocator()
    torch.testing.assert_close(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))
