"""Inputs at real model shapes, shared by the kernel benchmarks here and the GPU tests in
tests/gpu, so that what is timed is what is checked.

- `make_attention_batch`: a paged-attention batch whose requests own random blocks of the cache.
- `random_seeds`: one sampling seed per request.
- `sampling_metadata`: a sampler step's metadata with every logits processor off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import reference

if TYPE_CHECKING:
    from workers.sampler import SamplingMetadata

QWEN3_HEADS = (16, 8, 128)  # Qwen3-0.6B: query heads, KV heads, head dim
VOCAB = 151936  # Qwen3


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


def random_seeds(n: int, device: str = "cuda") -> torch.Tensor:
    return torch.randint(0, 2 ** 63 - 1, (n,), device=device)


def sampling_metadata(temperature: torch.Tensor, **fields) -> SamplingMetadata:
    """A step's metadata with every processor off unless given. The sampler is a worker's, so
    this is the one place here that reaches into `workers` (imported when called)."""
    from workers.sampler import SamplingMetadata

    defaults = dict(
        temperature=temperature, all_greedy=bool((temperature == 0).all()), top_p=None, top_k=None,
        min_p=None, generators={}, seeds=None, torch_rows=None, presence_penalty=None,
        frequency_penalty=None, repetition_penalty=None, output_token_counts=None,
        prompt_token_mask=None, bias_rows=None, bias_token_ids=None, bias_values=None, ban_rows=None,
        ban_token_ids=None, max_num_logprobs=-1)
    return SamplingMetadata(**{**defaults, **fields})
