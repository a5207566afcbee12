"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels whose CPU launch cost would dominate
the GPU time at small batches. Graphs are captured once per batch size of a ladder; a step
pads its batch up to the next captured size, copies its inputs into the graph's static
buffers and replays. Mixed and prefill steps run eagerly.

With speculative decoding, steps that verify drafts run `1 + k` query tokens per request at
most, and graphs of that query length are captured too. A step with fewer drafts fills the
graph's spare tokens with one extra padding request, attending to itself and writing nowhere,
so requests keep their own query lengths and the graph its shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import AttentionMetadata


# Verification graphs cover batches of up to this many tokens: larger steps are bound by
# compute, where a graph saves little of the step's time.
MAX_VERIFY_GRAPH_TOKENS = 1024


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8)) + list(range(272, 1024 + 1, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_req: int,
                 device: torch.device, spec_query_len: int = 1) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.spec_query_len = spec_query_len
        self.spec_sizes = [s for s in self.sizes if s * spec_query_len <= MAX_VERIFY_GRAPH_TOKENS
                           ] if spec_query_len > 1 else []
        n = self.max_batch
        num_tokens = max(n, n * spec_query_len if self.spec_sizes else 0)
        # Static buffers: a replay reads exactly these addresses. One request more than the
        # largest batch: the padding request of verification graphs.
        self.input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n + 1, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 2, dtype=torch.int32, device=device)
        self.decode_query_start_loc = self.query_start_loc.clone()
        self.arange = torch.arange(num_tokens, device=device)  # the padding request's positions
        self.block_tables = torch.zeros(n + 1, max_blocks_per_req, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _metadata(self, num_reqs: int, num_tokens: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=self.query_start_loc[:num_reqs + 1],
            seq_lens=self.seq_lens[:num_reqs],
            block_tables=self.block_tables[:num_reqs],
        )

    def _forward(self, num_reqs: int, num_tokens: int, query_len: int) -> torch.Tensor:
        metadata = self._metadata(num_reqs, num_tokens)
        if query_len == 1:
            # Sorted inside the graph, on each replay's sequence lengths.
            metadata.decode_order = torch.argsort(metadata.seq_lens, descending=True)
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        shapes = [(batch, 1) for batch in self.sizes] + [(batch, self.spec_query_len) for batch in self.spec_sizes]
        # Largest first: smaller graphs then reuse the big one's memory pool.
        for batch, query_len in sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True):
            num_tokens = batch * query_len
            num_reqs = batch + (query_len > 1)
            self.query_start_loc[:num_reqs + 1].copy_(torch.arange(num_reqs + 1) * query_len)
            self.query_start_loc[num_reqs] = num_tokens
            self.seq_lens.fill_(query_len)
            self._forward(num_reqs, num_tokens, query_len)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch, query_len] = self._forward(num_reqs, num_tokens, query_len)
            self.graphs[batch, query_len] = graph
        torch.cuda.synchronize()

    def can_run(self, num_reqs: int, max_query_len: int = 1) -> bool:
        if not self.graphs:
            return False  # not captured yet (the warm-up runs eagerly)
        if max_query_len == 1:
            return num_reqs <= self.max_batch
        return max_query_len <= self.spec_query_len and bool(self.spec_sizes) and num_reqs <= self.spec_sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
            max_query_len: int = 1) -> torch.Tensor:
        num_tokens = input_ids.shape[0]
        num_reqs = metadata.seq_lens.shape[0]
        query_len = 1 if max_query_len == 1 else self.spec_query_len
        batch = next(s for s in (self.sizes if query_len == 1 else self.spec_sizes) if s >= num_reqs)
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(metadata.seq_lens, non_blocking=True)
        self.block_tables[:num_reqs, :width].copy_(metadata.block_tables, non_blocking=True)
        if query_len == 1:
            self.query_start_loc.copy_(self.decode_query_start_loc, non_blocking=True)
            if batch > num_reqs:
                # Padding rows write nowhere (slot -1) and attend to one cached token.
                self.slot_mapping[num_reqs:batch].fill_(-1)
                self.seq_lens[num_reqs:batch].fill_(1)
        else:
            self._pad_verification(num_reqs, num_tokens, batch, metadata.query_start_loc)
        self.graphs[batch, query_len].replay()
        return self.outputs[batch, query_len][:num_tokens]

    def _pad_verification(self, num_reqs: int, num_tokens: int, batch: int, query_start_loc: torch.Tensor) -> None:
        """Requests past the real ones: the first holds the spare tokens, attending causally
        to themselves at positions 0.. in block 0 and writing nowhere; the rest have no query
        token and one cached token."""
        graph_tokens = batch * self.spec_query_len
        num_spare = graph_tokens - num_tokens
        self.query_start_loc[:num_reqs + 1].copy_(query_start_loc, non_blocking=True)
        self.query_start_loc[num_reqs + 1:batch + 2].fill_(graph_tokens)
        self.seq_lens[num_reqs:batch + 1].fill_(1)
        self.seq_lens[num_reqs:num_reqs + 1].fill_(max(num_spare, 1))
        self.block_tables[num_reqs:batch + 1].zero_()
        self.slot_mapping[num_tokens:graph_tokens].fill_(-1)
        self.positions[num_tokens:graph_tokens].copy_(self.arange[:num_spare], non_blocking=True)
