"""Forward steps of a model over a paged KV cache, built by hand: the GPU tests compare their
logits with transformers' (and TP=2's with TP=1's) without the engine around them."""

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


BLOCK_SIZE, NUM_BLOCKS = 16, 256
# Step 1: partial prefills (one request has nothing to do yet). Step 2: the rest of the
# prompts over their cached prefixes, mixed with a decode-length chunk.
STEPS = [[(0, 200), (0, 30), (0, 0), (0, 1)], [(200, 300), (30, 37), (0, 129), (1, 1)]]
SEQUENCE_LENGTHS = (300, 37, 129, 1)


@torch.inference_mode()
def mixed_batch_logits(model: nn.Module, seqs: list[list[int]], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The logits of STEPS' second step over a paged KV cache (block tables a fixed
    permutation), and each request's first row in them."""
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, layer.head_dim,
                                     dtype=dtype, device=device)
    permutation = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    tables = permutation.view(len(seqs), -1)[:, :32].to(device)
    paged_step_logits(model, seqs, tables, BLOCK_SIZE, STEPS[0])
    return paged_step_logits(model, seqs, tables, BLOCK_SIZE, STEPS[1])
