"""Peak GPU memory of a forward pass, for sizing the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import AttentionMetadata


@torch.inference_mode()
def peak_forward_memory(model: nn.Module, num_tokens: int, device: torch.device) -> int:
    """Bytes in use at the peak of a forward over `num_tokens` tokens (one sequence) plus
    logits for as many rows: weights, activations, and memory held outside torch (the CUDA
    context)."""
    layers = model.attention_layers()
    block_size = 16
    num_blocks = -(-num_tokens // block_size)
    attn = layers[0]
    shape = (2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    dtype = next(model.parameters()).dtype
    for layer in layers:
        layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    positions = torch.arange(num_tokens, device=device)
    metadata = AttentionMetadata(
        slot_mapping=positions.clone(),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device).unsqueeze(0),
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), positions, metadata)
    model.compute_logits(hidden)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for layer in layers:
        layer.kv_cache = torch.empty(0)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return peak + max(outside_torch, 0)
