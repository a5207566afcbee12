"""Triton kernels against the torch references on a CUDA GPU, at real model shapes (skipped
without one). On the GPU machine:

    PYTHONPATH=$PWD python -m pytest tests/gpu -q
    PYTHONPATH=$PWD python tests/gpu/test_kernels_gpu.py --bench   # decode/prefill attention timings

Attention is checked against the reference run in float32 on upcast inputs, by the relative
error ||out - ref|| / ||ref||: bf16 operands land between 1e-3 and 1e-2. Outputs come from
memory the caching allocator had filled with NaN, so an element the kernel never wrote shows.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

from kernels import reference

if TYPE_CHECKING:
    from kernels.triton_attention import AttentionConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QWEN3_HEADS = (16, 8, 128)  # Qwen3-0.6B: query heads, KV heads, head dim
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}


@dataclass
class AttentionBatch:
    query: torch.Tensor
    kv_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor

    def args(self) -> tuple:
        return self.query, self.kv_cache, self.query_start_loc, self.seq_lens, self.block_tables


def make_attention_batch(query_lens: list[int], context_lens: list[int], num_heads: int,
                         num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                         spare_blocks_per_req: int = 0, poison: bool = True) -> AttentionBatch:
    """Each request's blocks are a random subset of the cache; its sequence's KV are written,
    and with `poison` every other slot holds NaN (a read past a sequence's end shows)."""
    device = torch.device("cuda")
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    blocks_per_req = [-(-s // block_size) + spare_blocks_per_req for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 1  # the last block is never a sequence's
    perm = torch.randperm(num_blocks - 1).tolist()
    block_tables = torch.full((len(seq_lens), max(blocks_per_req)), num_blocks - 1, dtype=torch.int32)
    slots = []
    for i, seq_len in enumerate(seq_lens):
        blocks = torch.tensor([perm.pop() for _ in range(blocks_per_req[i])], dtype=torch.int32)
        block_tables[i, :len(blocks)] = blocks
        pos = torch.arange(seq_len)
        slots.append(blocks[pos // block_size].long() * block_size + pos % block_size)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if poison:
        kv_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        slot_mapping = torch.cat(slots).to(device)
        kv = torch.randn(2, slot_mapping.shape[0], num_kv_heads, head_dim, device=device).to(dtype)
        reference.write_kv_cache(kv[0], kv[1], kv_cache, slot_mapping)
    else:
        kv_cache = torch.randn(shape, device=device).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    query_start_loc = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    return AttentionBatch(query, kv_cache, query_start_loc.to(device),
                          torch.tensor(seq_lens, dtype=torch.int32, device=device),
                          block_tables.to(device))


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


# --------------------------------------------------------------------------------- benchmark

# The bandwidth roofline is this device's copy rate, measured first; the FLOP roofline is the
# H100's bf16 8192^3 matrix product (shared/device/README.md; an H200 measured about the same).
MATMUL_FLOPS_PER_S = 777e12


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3


def bench() -> None:
    from kernels.triton_attention import AttentionConfig, paged_attention_with_config, select_config

    torch.manual_seed(0)
    rows: list[str] = []
    num_heads, num_kv_heads, head_dim = QWEN3_HEADS

    bandwidth = 0.0  # bytes/s, set by the copy below

    def report(name: str, seconds: float, nbytes: float = 0.0, flops: float = 0.0) -> None:
        floor = max(nbytes / bandwidth if bandwidth else 0.0, flops / MATMUL_FLOPS_PER_S)
        row = f"{name:<72} {seconds * 1e6:9.1f} us  floor {floor * 1e6:8.1f} us  {floor / seconds:6.1%}"
        if nbytes:
            row += f"  {nbytes / seconds / 1e12:5.2f} TB/s"
        if flops:
            row += f"  {flops / seconds / 1e12:6.1f} TFLOP/s"
        rows.append(row)
        print(row, flush=True)

    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    copy_dst = torch.empty_like(copy_src)
    rows.append(torch.cuda.get_device_name())
    copy_seconds = _bench(lambda: copy_dst.copy_(copy_src))
    bandwidth = 2 * copy_src.numel() / copy_seconds
    report("device-to-device copy 1 GiB (read + write): the roofline", copy_seconds,
           nbytes=2 * copy_src.numel())
    del copy_src, copy_dst

    def kv_bytes(batch: AttentionBatch) -> float:
        tokens = batch.seq_lens.sum().item()
        return (2 * tokens * num_kv_heads * head_dim * batch.kv_cache.element_size()
                + 2 * batch.query.numel() * batch.query.element_size())

    # (name, context lengths, configurations to compare with the automatic one)
    decode_cases = [
        ("decode B=256 ctx=1024", [1023] * 256,
         [AttentionConfig(16, 64, 1, 4, 3), AttentionConfig(16, 128, 1, 4, 2)]),
        ("decode B=256 ctx~U[100,2048]", [random.Random(0).randint(99, 2047) for _ in range(256)], []),
        ("decode B=64 ctx=1024", [1023] * 64, []),
        ("decode B=32 ctx=1024", [1023] * 32, [AttentionConfig(16, 64, s, 4, 2) for s in (1, 2, 4)]),
        ("decode B=16 ctx=1024", [1023] * 16, []),
        ("decode B=4 ctx=4096", [4095] * 4, []),
    ]
    for name, context_lens, configs in decode_cases:
        batch = make_attention_batch([1] * len(context_lens), context_lens, *QWEN3_HEADS, 16,
                                     torch.bfloat16, poison=False)
        nbytes = kv_bytes(batch)
        auto = select_config(len(context_lens), len(context_lens), num_heads // num_kv_heads,
                             batch.block_tables.shape[1] * 16, num_kv_heads, batch.query.device)
        order = torch.argsort(batch.seq_lens, descending=True)  # as the CUDA graphs start them
        for config in (auto, *configs):
            seconds = _bench(lambda: paged_attention_with_config(*batch.args(), 0.088, config, order))
            label = "auto" if config is auto else "    "
            report(f"{name} {label} m/n/splits/warps/stages {config.block_m}/{config.block_n}/"
                   f"{config.num_splits}/{config.num_warps}/{config.num_stages}", seconds, nbytes=nbytes)
        del batch

    # Prefill: causal FLOPs = 4 * D * H * sum over prompts of (new tokens x keys seen on average).
    prefill_cases = [
        ("prefill 8x1024 from scratch", [1024] * 8, [0] * 8,
         [AttentionConfig(128, 64, 1, 4, 3), AttentionConfig(128, 128, 1, 8, 2)]),
        ("prefill 4x512 chunk over 2048 cached", [512] * 4, [2048] * 4, []),
    ]
    for name, query_lens, context_lens, configs in prefill_cases:
        batch = make_attention_batch(query_lens, context_lens, *QWEN3_HEADS, 16, torch.bfloat16, poison=False)
        flops = 4 * head_dim * num_heads * sum(q * (c + (q + 1) / 2) for q, c in zip(query_lens, context_lens))
        auto = select_config(sum(query_lens), len(query_lens), num_heads // num_kv_heads,
                             batch.block_tables.shape[1] * 16, num_kv_heads, batch.query.device)
        for config in (auto, *configs):
            seconds = _bench(lambda: paged_attention_with_config(*batch.args(), 0.088, config))
            label = "auto" if config is auto else "    "
            report(f"{name} {label} m/n/warps/stages {config.block_m}/{config.block_n}/"
                   f"{config.num_warps}/{config.num_stages}", seconds, flops=flops)
        del batch
    q = torch.randn(8, num_heads, 1024, head_dim, device="cuda").bfloat16()
    k = torch.randn(8, num_kv_heads, 1024, head_dim, device="cuda").bfloat16()
    v = torch.randn_like(k)
    flops = 4 * head_dim * num_heads * 8 * 1024 * 1025 / 2
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    report("torch SDPA dense causal 8x1024 (comparison)", _bench(sdpa), flops=flops)

    table = "\n".join(rows)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_attention.txt"), "w") as f:
            f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time attention against the roofline")
    if parser.parse_args().bench:
        bench()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
