"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels whose CPU launch cost would dominate
the GPU time at small batches. Graphs are captured once per batch size of a ladder; a step
pads its batch up to the next captured size, copies its inputs into the graph's static
buffers and replays. Mixed and prefill steps run eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8)) + list(range(272, 1024 + 1, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_req: int,
                 device: torch.device) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        # Static buffers: a replay reads exactly these addresses.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_req, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
        )

    def _forward(self, batch: int) -> torch.Tensor:
        metadata = self._metadata(batch)
        # Sorted inside the graph, on each replay's sequence lengths.
        metadata.decode_order = torch.argsort(metadata.seq_lens, descending=True)
        return self.model(self.input_ids[:batch], self.positions[:batch], metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first: smaller graphs then reuse the big one's memory pool.
        for batch in reversed(self.sizes):
            self._forward(batch)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def can_run(self, num_reqs: int) -> bool:
        return num_reqs <= self.max_batch and bool(self.graphs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_reqs = input_ids.shape[0]
        batch = next(s for s in self.sizes if s >= num_reqs)
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_reqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_reqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_reqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(metadata.seq_lens, non_blocking=True)
        self.block_tables[:num_reqs, :width].copy_(metadata.block_tables, non_blocking=True)
        if batch > num_reqs:
            # Padding rows write nowhere (slot -1) and attend to one cached token.
            self.slot_mapping[num_reqs:batch].fill_(-1)
            self.seq_lens[num_reqs:batch].fill_(1)
        self.graphs[batch].replay()
        return self.outputs[batch][:num_reqs]
