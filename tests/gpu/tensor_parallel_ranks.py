"""What each rank runs in tests/gpu/test_tensor_parallel_gpu.py's logits check: kept apart
from the test module so that the spawned processes import only torch and the workers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tests.gpu.paged_steps import mixed_batch_logits
from workers.distributed import init_tensor_parallel
from workers.model_loader import load_model


def run_rank(rank: int, init_method: str, path: Path, seqs: list[list[int]], dtype: torch.dtype,
             device_type: str, out_prefix: Path) -> None:
    """One of two ranks: the model's shard on this rank's device, its logits saved to
    `{out_prefix}-rank{rank}.pt` (every rank holds the whole logits)."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    group = init_tensor_parallel(rank, 2, init_method, device)
    model = load_model(path, dtype, device, group)
    logits, _ = mixed_batch_logits(model, seqs, dtype, device)
    torch.save(logits.float().cpu(), f"{out_prefix}-rank{rank}.pt")
    dist.destroy_process_group()
