"""Shared fixtures and helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from workers.attention import AttentionMetadata


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, converted once into `$OCTAVO_CACHE_DIR` (default
    `~/.cache/octavo`) and reused by later sessions; the first conversion takes ~30 s plus
    the wheel download."""
    from workers.model_source import resolve_model

    return resolve_model(None)


class PagedSequences:
    """KV caches bound to a model's attention layers, plus the bookkeeping to run steps over
    several sequences the way the model runner does: each sequence owns `max_blocks` blocks,
    interleaved across sequences so block tables are not the identity."""

    def __init__(self, model: nn.Module, num_seqs: int, max_blocks: int, block_size: int,
                 dtype: torch.dtype) -> None:
        self.num_seqs = num_seqs
        self.block_size = block_size
        num_blocks = num_seqs * max_blocks
        self.block_tables = torch.arange(num_blocks, dtype=torch.int32).view(max_blocks, num_seqs).T.contiguous()
        self.num_cached = [0] * num_seqs
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                         dtype=dtype)

    def step(self, new_tokens: dict[int, int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Metadata (and positions) for one step scheduling `new_tokens[seq]` tokens of each
        listed sequence, in the listed order; their KV count as cached afterwards."""
        seqs = list(new_tokens)
        positions, slots, starts, seq_lens = [], [], [0], []
        for seq in seqs:
            start, count = self.num_cached[seq], new_tokens[seq]
            for pos in range(start, start + count):
                block = int(self.block_tables[seq, pos // self.block_size])
                slots.append(block * self.block_size + pos % self.block_size)
                positions.append(pos)
            starts.append(starts[-1] + count)
            seq_lens.append(start + count)
            self.num_cached[seq] += count
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=self.block_tables[seqs],
        )
        return torch.tensor(positions, dtype=torch.int64), metadata


@pytest.fixture
def paged_sequences() -> type[PagedSequences]:
    """`paged_sequences(model, num_seqs, max_blocks, block_size, dtype)` binds KV caches to
    the model and returns a `PagedSequences` whose `step({seq: num_new_tokens})` gives
    (positions, AttentionMetadata) for one model step."""
    return PagedSequences
