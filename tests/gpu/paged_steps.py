"""One forward step of a model over a paged KV cache, built by hand: the GPU tests compare its
logits with transformers' without the engine around it."""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import AttentionMetadata


def paged_step_logits(model: nn.Module, seqs: list[list[int]], tables: torch.Tensor, block_size: int,
                      chunks: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
    """Request i computes tokens [start, end) of seqs[i], its KV in the blocks of tables[i].
    Returns the logits of every token of the step and each request's first row in them."""
    device = tables.device
    ids, pos, slots, starts, lens = [], [], [], [0], []
    for i, (start, end) in enumerate(chunks):
        ids += seqs[i][start:end]
        pos += list(range(start, end))
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(start, end)]
        starts.append(starts[-1] + end - start)
        lens.append(end)
    metadata = AttentionMetadata(torch.tensor(slots, device=device),
                                 torch.tensor(starts, dtype=torch.int32, device=device),
                                 torch.tensor(lens, dtype=torch.int32, device=device), tables)
    hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), metadata)
    return model.compute_logits(hidden), starts
