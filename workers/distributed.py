"""Tensor parallelism: the group of ranks that share one model, and the collectives its
layers need.

A `TensorParallelGroup` is passed to a model at construction, never looked up globally, so
one process can hold models of different parallelism (a single-rank draft model beside a
sharded target) and tests can build a rank's shards without any process group. With
`world_size` 1 every collective returns its input untouched: TP=1 pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's `rank` among the `world_size` ranks sharing a model, and the
    torch.distributed group they talk over (None: the default group)."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, in place."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.process_group)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (a start-up agreement, not a step's)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend(self.process_group) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.process_group)
        return int(t.item())

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` concatenated along the last dim, in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.cat(parts, dim=-1)


SINGLE_RANK = TensorParallelGroup()


def init_tensor_parallel(rank: int, world_size: int, init_method: str | None,
                         device: torch.device | str) -> TensorParallelGroup:
    """Join the `world_size` processes of one tensor-parallel model (NCCL on CUDA devices,
    gloo on the CPU) through `init_method` ("tcp://host:port" or "file:///path") and return
    this rank's group. Call once per process, before building the model; with one rank no
    process group is needed and none is made."""
    if world_size == 1:
        return TensorParallelGroup(rank, world_size)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return TensorParallelGroup(rank, world_size, dist.group.WORLD)
