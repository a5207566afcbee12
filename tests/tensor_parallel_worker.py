"""What each rank runs in tests/test_tensor_parallel_model.py: kept apart from the test module
so the spawned processes import only torch and the workers, not transformers' models."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from conftest import PagedSequences
from workers.distributed import TensorParallelGroup, init_tensor_parallel
from workers.model_loader import load_model

# Two sequences: both prefill (a in one chunk of 7, b of 5), then decode one token each,
# in changing order, for three steps.
STEPS = [{0: 7, 1: 5}, {0: 1, 1: 1}, {1: 1, 0: 1}, {0: 1, 1: 1}]
BLOCK_SIZE = 4


def run_schedule(model: nn.Module, sequences: list[list[int]]) -> torch.Tensor:
    """The logits of every step of STEPS over the paged KV cache, rows in step order."""
    seqs = PagedSequences(model, num_seqs=2, max_blocks=3, block_size=BLOCK_SIZE, dtype=torch.float32)
    rows = []
    with torch.inference_mode():
        for step in STEPS:
            tokens = [t for seq, count in step.items()
                      for t in sequences[seq][seqs.num_cached[seq]:seqs.num_cached[seq] + count]]
            positions, metadata = seqs.step(step)
            rows.append(model.compute_logits(model(torch.tensor(tokens), positions, metadata)))
    return torch.cat(rows)


def reference_rows(per_sequence: list[torch.Tensor]) -> torch.Tensor:
    """Whole-sequence logits (one tensor per sequence) arranged as `run_schedule` gives them."""
    done = [0] * len(per_sequence)
    rows = []
    for step in STEPS:
        for seq, count in step.items():
            rows.append(per_sequence[seq][done[seq]:done[seq] + count])
            done[seq] += count
    return torch.cat(rows)


def run_rank(rank: int, init_method: str, checkpoints: dict[str, Path],
             sequences: list[list[int]], out_dir: Path) -> None:
    """One of 4 processes: every checkpoint at TP=4 over all of them, and at TP=2 over two
    independent pairs (ranks 0-1 and 2-3, each taking half the checkpoints)."""
    torch.set_num_threads(1)
    world = init_tensor_parallel(rank, 4, init_method, "cpu")
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = TensorParallelGroup(rank % 2, 2, pairs[rank // 2])
    names = list(checkpoints)
    runs = [(pair, name) for name in names[rank // 2::2]] + [(world, name) for name in names]
    for group, name in runs:
        model = load_model(checkpoints[name], torch.float32, torch.device("cpu"), group)
        attn = model.attention_layers()[0]
        torch.save({"logits": run_schedule(model, sequences),
                    "heads": (attn.num_heads, attn.num_kv_heads),
                    "tied": model.lm_head.weight is model.model.embed_tokens.weight},
                   out_dir / f"{name}-tp{group.world_size}-rank{group.rank}.pt")
    dist.destroy_process_group()


def run_pair(rank: int, init_method: str, checkpoints: dict[str, Path], sequences: list[list[int]],
             out_dir: Path) -> None:
    """One of 2 processes: every checkpoint at TP=2."""
    torch.set_num_threads(1)
    group = init_tensor_parallel(rank, 2, init_method, "cpu")
    for name, path in checkpoints.items():
        model = load_model(path, torch.float32, torch.device("cpu"), group)
        torch.save({"logits": run_schedule(model, sequences)}, out_dir / f"{name}-tp2-rank{rank}.pt")
    dist.destroy_process_group()
