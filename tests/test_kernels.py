"""Kernel tests on the CPU.

Two layers:
- The torch references (`kernels.reference`) are pinned against plain dense attention and
  textbook formulas, in this process.
- The Triton kernels (`kernels.triton_ops`) are compared with the references under the Triton
  interpreter. TRITON_INTERPRET must be set before triton is imported and must not leak into
  other tests of this pytest process, so every interpreter check runs in one subprocess that
  executes this file as a script and reports each case's outcome as JSON. They use float32 and
  float16: the interpreter mishandles bfloat16 (triton 3.9: bf16 dot products come out as
  garbage, casts truncate), which tests/gpu covers on real hardware.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from triton_interpreter import interpreter_tests, run_cases



# ----------------------------------------------------------------------------- input builders

@dataclass
class AttentionBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    keys: list[torch.Tensor]  # per request, the whole sequence's keys [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]

    def args(self) -> tuple:
        return self.query, self.kv_cache, self.query_start_loc, self.seq_lens, self.block_tables

    def clean_args(self) -> tuple:
        """args() with the stale slots zeroed: what a kernel may read there is not under test."""
        return self.query, self.kv_cache.nan_to_num(0.0), *self.args()[2:]


def make_attention_batch(query_lens: list[int], context_lens: list[int], num_heads: int,
                         num_kv_heads: int, head_dim: int, block_size: int,
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> AttentionBatch:
    """Request i has context_lens[i] cached tokens and query_lens[i] new ones, all already in the
    cache (write_kv_cache runs before attention), in randomly permuted blocks. Every other cache
    slot and every unused block-table entry's block holds NaN, so a read past a sequence's end
    shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 1  # the last block stays all-NaN
    perm = torch.randperm(num_blocks - 1, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max(blocks_per_req) + 1), num_blocks - 1, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    keys, values = [], []
    for i, seq_len in enumerate(seq_lens):
        blocks = [perm.pop() for _ in range(blocks_per_req[i])]
        block_tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)],
                             dtype=torch.int64)
        keys.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        reference.write_kv_cache(keys[-1], values[-1], kv_cache, slots)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return AttentionBatch(query, kv_cache, query_start_loc, torch.tensor(seq_lens, dtype=torch.int32),
                          block_tables, keys, values)


def dense_causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """query [n, Hq, D] holds the last n tokens of a sequence whose keys/values are
    [S, Hkv, D]: run causal SDPA over the whole sequence (other queries zero) and keep those
    n rows. Query head h reads KV head h // (Hq // Hkv)."""
    seq_len, n = keys.shape[0], query.shape[0]
    group = query.shape[1] // keys.shape[1]
    full_query = torch.zeros(seq_len, *query.shape[1:], dtype=torch.float64)
    full_query[seq_len - n:] = query.double()
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(full_query.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), is_causal=True, scale=scale)
    return out.transpose(0, 1)[seq_len - n:]


def rope_cos_sin_cache(max_position: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


# A batch with every kind of request: a prefill from scratch, a prefill chunk over a cached
# prefix crossing block boundaries, decodes (one at position 0), a request with no query this
# step, and a speculative-decoding verification of three tokens.
MIXED_QUERY_LENS = [19, 7, 1, 0, 1, 3]
MIXED_CONTEXT_LENS = [0, 21, 33, 5, 0, 15]


# ------------------------------------------------------------------ the references, pinned

@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_paged_attention_matches_dense_attention(num_heads: int, num_kv_heads: int,
                                                           block_size: int) -> None:
    batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, num_heads, num_kv_heads,
                                 head_dim=32, block_size=block_size, dtype=torch.float64)
    scale = 0.3
    out = reference.paged_attention(*batch.clean_args(), scale)
    starts = batch.query_start_loc.tolist()
    for i in range(len(MIXED_QUERY_LENS)):
        q = batch.query[starts[i]:starts[i + 1]]
        if q.shape[0] == 0:
            continue
        expected = dense_causal_attention(q, batch.keys[i], batch.values[i], scale)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], expected)


def test_reference_paged_attention_ignores_stale_cache_slots() -> None:
    # Slots past a sequence's end hold whatever an earlier request left (NaN here).
    batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 4, 2, head_dim=32, block_size=16)
    out = reference.paged_attention(*batch.args(), 0.3)
    torch.testing.assert_close(out, reference.paged_attention(*batch.clean_args(), 0.3))


def test_reference_write_kv_cache_skips_padding_slots() -> None:
    kv_cache = torch.zeros(2, 3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    reference.write_kv_cache(key, value, kv_cache, torch.tensor([5, -1, 8]))
    torch.testing.assert_close(kv_cache[0, 1, 1], key[0])  # slot 5 = block 1, offset 1
    torch.testing.assert_close(kv_cache[1, 2, 0], value[2])  # slot 8 = block 2, offset 0
    assert int((kv_cache != 0).any(-1).any(-1).sum()) == 4  # two slots, key and value planes


def test_reference_rms_norm_matches_formula() -> None:
    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    out, new_residual = reference.rms_norm(x, weight, 1e-6, residual)
    s = (x + residual).double()
    expected = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(out, expected.float())
    torch.testing.assert_close(new_residual, x + residual)
    _, same = reference.rms_norm(x, weight, 1e-6)
    assert same is x


def test_reference_rotary_embedding_matches_rotate_half_formula() -> None:
    head_dim = 16
    cache = rope_cos_sin_cache(64, head_dim)
    positions = torch.tensor([0, 3, 63, 17])
    query, key = torch.randn(4, 4, head_dim), torch.randn(4, 2, head_dim)
    expected = []
    for x in (query, key):
        cos, sin = cache[positions, :head_dim // 2], cache[positions, head_dim // 2:]
        cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
        rotate_half = torch.cat((-x[..., head_dim // 2:], x[..., :head_dim // 2]), -1)
        expected.append(x * cos + rotate_half * sin)
    reference.rotary_embedding(positions, query, key, cache)
    torch.testing.assert_close(query, expected[0])
    torch.testing.assert_close(key, expected[1])


def test_reference_norm_rope_write_kv_leaves_its_inputs() -> None:
    cache = rope_cos_sin_cache(16, 8)
    positions = torch.tensor([3, 5])
    query, key, value = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    inputs = [t.clone() for t in (query, key, value)]
    kv_cache = torch.zeros(2, 1, 4, 2, 8)
    out = reference.norm_rope_write_kv(query, key, value, positions, cache, kv_cache, torch.tensor([1, 2]))
    rotated_key = key.clone()
    reference.rotary_embedding(positions, query.clone(), rotated_key, cache)
    torch.testing.assert_close(kv_cache[0, 0, 1:3], rotated_key)
    torch.testing.assert_close(kv_cache[1, 0, 1:3], value)
    assert not torch.equal(out, query)
    for t, before in zip((query, key, value), inputs):
        torch.testing.assert_close(t, before, atol=0, rtol=0)


def test_reference_silu_and_mul_matches_formula() -> None:
    x = torch.randn(3, 2 * 24)
    gate, up = x[:, :24].double(), x[:, 24:].double()
    torch.testing.assert_close(reference.silu_and_mul(x), (gate * torch.sigmoid(gate) * up).float())


# ------------------------------------------------- Triton kernels under the interpreter

def _check_attention(batch: AttentionBatch, scale: float, atol: float, rtol: float) -> None:
    """The public kernel (its own configuration choice) and each configuration path forced:
    the small decode tile unsplit and split in 2 and 4, and the large prefill tile."""
    from kernels import triton_ops
    from kernels.triton_attention import AttentionConfig, paged_attention_with_config

    expected = reference.paged_attention(*batch.clean_args(), scale)
    outs = {"auto": triton_ops.paged_attention(*batch.args(), scale)}
    group = batch.query.shape[1] // batch.kv_cache.shape[3]
    for block_m, block_n, splits in [(16, 32, 1), (16, 16, 2), (16, 64, 4), (64, 32, 1)]:
        config = AttentionConfig(max(block_m, group), block_n, splits, num_warps=4, num_stages=2)
        outs[str(config)] = paged_attention_with_config(*batch.args(), scale, config)
    for name, out in outs.items():
        assert not out.isnan().any(), name
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _attention_mixed_case(num_heads: int, num_kv_heads: int, head_dim: int,
                          block_size: int) -> Callable[[], None]:
    def case() -> None:
        batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, num_heads, num_kv_heads,
                                     head_dim, block_size)
        _check_attention(batch, scale=head_dim ** -0.5, atol=2e-5, rtol=2e-5)
    return case


def _case_attention_decode_lengths() -> None:
    # Decode-only, context lengths on both sides of page (16) and KV-tile boundaries.
    lens = [0, 15, 16, 17, 31, 63, 64, 65, 130]
    batch = make_attention_batch([1] * len(lens), lens, 4, 2, 64, 16, seed=1)
    _check_attention(batch, scale=0.125, atol=2e-5, rtol=2e-5)


def _case_attention_decode_order() -> None:
    # The programs of a decode batch started in a given order (longest first, as the CUDA
    # graphs ask, and an arbitrary one), split and not.
    from kernels import triton_ops
    from kernels.triton_attention import AttentionConfig, paged_attention_with_config

    lens = [130, 0, 64, 17, 65, 15]
    batch = make_attention_batch([1] * len(lens), lens, 4, 2, 64, 16, seed=4)
    expected = reference.paged_attention(*batch.clean_args(), 0.125)
    for order in (torch.argsort(batch.seq_lens, descending=True), torch.tensor([3, 5, 0, 1, 4, 2])):
        outs = [triton_ops.paged_attention(*batch.args(), 0.125, order)]
        for splits in (1, 4):
            config = AttentionConfig(16, 32, splits, num_warps=4, num_stages=2)
            outs.append(paged_attention_with_config(*batch.args(), 0.125, config, order))
        for out in outs:
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _case_attention_float16() -> None:
    batch = make_attention_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 4, 2, 64, 16,
                                 dtype=torch.float16, seed=2)
    _check_attention(batch, scale=0.125, atol=2e-3, rtol=2e-3)


def _case_attention_empty() -> None:
    from kernels import triton_ops

    batch = make_attention_batch([0, 0], [3, 17], 4, 2, 64, 16, seed=3)
    assert triton_ops.paged_attention(*batch.args(), 0.125).shape == (0, 4, 64)


def _case_norm_rope_write_kv() -> None:
    from kernels import triton_ops

    num_heads, num_kv_heads, head_dim = 4, 2, 64
    cache = rope_cos_sin_cache(100, head_dim)
    positions = torch.tensor([0, 1, 99, 42, 7, 3])
    slot_mapping = torch.tensor([17, -1, 0, 31, -1, 40])
    for dtype in (torch.float32, torch.float16):
        # q, k and v as the strided slices of a fused qkv projection, as models pass them.
        qkv = torch.randn(6, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        q, k, v = q.view(6, num_heads, head_dim), k.view(6, num_kv_heads, head_dim), v.view(6, num_kv_heads, head_dim)
        norm_weights = (torch.randn(head_dim).to(dtype), torch.randn(head_dim).to(dtype), 1e-6)
        for norm_args in ((), norm_weights):
            before = qkv.clone()
            expected_cache = torch.randn(2, 3, 16, num_kv_heads, head_dim).to(dtype)
            kv_cache = expected_cache.clone()
            expected = reference.norm_rope_write_kv(q, k, v, positions, cache, expected_cache, slot_mapping,
                                                    *norm_args)
            out = triton_ops.norm_rope_write_kv(q, k, v, positions, cache, kv_cache, slot_mapping, *norm_args)
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(kv_cache, expected_cache)
            torch.testing.assert_close(qkv, before, atol=0, rtol=0)  # inputs untouched


def _case_rms_norm() -> None:
    from kernels import triton_ops

    weight = torch.randn(96)
    x, residual = torch.randn(5, 96), torch.randn(5, 96)
    for res in (None, residual):
        out, new_residual = triton_ops.rms_norm(x, weight, 1e-6, res)
        expected, expected_residual = reference.rms_norm(x, weight, 1e-6, res)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    # Per-head norm (Qwen3's q/k norm) over a strided [tokens, heads, head_dim] slice.
    qkv = torch.randn(3, 6 * 32).half()
    q = qkv[:, :4 * 32].view(3, 4, 32)
    out, _ = triton_ops.rms_norm(q, weight[:32].half(), 1e-6)
    torch.testing.assert_close(out, reference.rms_norm(q, weight[:32].half(), 1e-6)[0])


def _case_silu_and_mul() -> None:
    from kernels import triton_ops

    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 5, 2 * 80).to(dtype)
        torch.testing.assert_close(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "attention_mixed_group1_page16_dim64": _attention_mixed_case(2, 2, 64, 16),
    "attention_mixed_group2_page32_dim64": _attention_mixed_case(4, 2, 64, 32),
    "attention_mixed_group4_page16_dim128": _attention_mixed_case(4, 1, 128, 16),
    "attention_mixed_group8_page32_dim64": _attention_mixed_case(8, 1, 64, 32),
    "attention_decode_lengths": _case_attention_decode_lengths,
    "attention_decode_order": _case_attention_decode_order,
    "attention_float16": _case_attention_float16,
    "attention_empty": _case_attention_empty,
    "norm_rope_write_kv": _case_norm_rope_write_kv,
    "rms_norm": _case_rms_norm,
    "silu_and_mul": _case_silu_and_mul,
}


interpreter_results, test_triton_kernel_matches_reference = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])
