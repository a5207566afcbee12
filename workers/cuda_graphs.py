"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels whose CPU launch cost would dominate
the GPU time at small batches. Graphs are captured once per batch size of a ladder; a step
pads its batch up to the next captured size, copies its inputs into the graph's static
buffers and replays. Mixed and prefill steps run eagerly.

A step's inputs reach the graph in two host-to-device copies: the host writes them with numpy
into a pinned mirror of the graph's input buffer (padding included), and the copies move the
small arrays and the block-table rows in use. Per-array device tensors and copies would cost
the host more than the small batches' whole GPU step.

With speculative decoding, steps that verify drafts run `1 + k` query tokens per request at
most, and graphs of that query length are captured too. A step with fewer drafts fills the
graph's spare tokens with one extra padding request, attending to itself and writing nowhere,
so requests keep their own query lengths and the graph its shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.attention import AttentionMetadata
from workers.step_inputs import StepInputs
from workers.upload import aligned, torch_dtype


# Verification graphs cover batches of up to this many tokens: larger steps are bound by
# compute, where a graph saves little of the step's time.
MAX_VERIFY_GRAPH_TOKENS = 1024
# Host mirrors of the input buffer, used in turn: one is written while the last one's copies
# may still wait in the stream.
_NUM_MIRRORS = 2


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
        # The input buffer a replay reads. One request more than the largest batch: the padding
        # request of verification graphs. The block table comes last, so that a step copies
        # only the rows its graph reads.
        fields = {"seq_lens": (np.int32, (n + 1,)), "query_start_loc": (np.int32, (n + 2,)),
                  "input_ids": (np.int64, (num_tokens,)), "positions": (np.int64, (num_tokens,)),
                  "slot_mapping": (np.int64, (num_tokens,)), "in_flight": (np.int64, (num_tokens,)),
                  "in_flight_source": (np.int64, (num_tokens,)),
                  "block_tables": (np.int32, (n + 1, max_blocks_per_req))}
        self.layout: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, (dtype, shape) in fields.items():
            self.layout[name] = (offset, np.dtype(dtype), shape)
            offset += aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.block_tables_offset = self.layout["block_tables"][0]
        self.block_table_row_bytes = max_blocks_per_req * 4
        self.device_buffer = torch.zeros(offset, dtype=torch.uint8, device=device)
        static = self._device_views(self.device_buffer)
        self.input_ids, self.positions, self.slot_mapping = (static["input_ids"], static["positions"],
                                                             static["slot_mapping"])
        self.seq_lens, self.query_start_loc, self.block_tables = (static["seq_lens"], static["query_start_loc"],
                                                                  static["block_tables"])
        self.in_flight, self.in_flight_source = static["in_flight"], static["in_flight_source"]
        self.mirrors = [torch.zeros(offset, dtype=torch.uint8, pin_memory=True) for _ in range(_NUM_MIRRORS)]
        self.mirror_views = [self._host_views(m) for m in self.mirrors]
        self.mirror_copied = [torch.cuda.Event() for _ in range(_NUM_MIRRORS)]
        self.num_runs = 0
        self.arange = np.arange(num_tokens + n + 2)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _device_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buffer[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(torch_dtype(dtype)).view(shape)
                for name, (offset, dtype, shape) in self.layout.items()}

    def _host_views(self, buffer: torch.Tensor) -> dict[str, np.ndarray]:
        data = buffer.numpy()
        return {name: data[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
                for name, (offset, dtype, shape) in self.layout.items()}

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
        self.slot_mapping.fill_(-1)  # capture-time forwards write nowhere
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

    def run(self, inputs: StepInputs, max_query_len: int = 1) -> torch.Tensor:
        num_tokens, num_reqs = inputs.num_tokens, inputs.num_reqs
        query_len = 1 if max_query_len == 1 else self.spec_query_len
        batch = next(s for s in (self.sizes if query_len == 1 else self.spec_sizes) if s >= num_reqs)
        turn = self.num_runs % _NUM_MIRRORS
        self.num_runs += 1
        self.mirror_copied[turn].synchronize()  # the copies that last read this mirror are done
        host = self.mirror_views[turn]
        host["positions"][:num_tokens] = inputs.positions
        host["slot_mapping"][:num_tokens] = inputs.slot_mapping
        host["seq_lens"][:num_reqs] = inputs.seq_lens
        host["block_tables"][:num_reqs, :inputs.block_tables.shape[1]] = inputs.block_tables
        host_ids = isinstance(inputs.input_ids, np.ndarray)
        if host_ids:
            host["input_ids"][:num_tokens] = inputs.input_ids
        num_in_flight = len(inputs.in_flight)
        host["in_flight"][:num_in_flight] = inputs.in_flight
        host["in_flight_source"][:num_in_flight] = inputs.in_flight_source
        if query_len == 1:
            host["query_start_loc"][:batch + 1] = self.arange[:batch + 1]
            # Padding rows write nowhere (slot -1) and attend to one cached token.
            host["slot_mapping"][num_reqs:batch] = -1
            host["seq_lens"][num_reqs:batch] = 1
        else:
            self._pad_verification(host, num_reqs, num_tokens, batch, inputs.query_start_loc)
        mirror = self.mirrors[turn]
        end = self.block_tables_offset + (batch + 1) * self.block_table_row_bytes
        self.device_buffer[:self.block_tables_offset].copy_(mirror[:self.block_tables_offset], non_blocking=True)
        self.device_buffer[self.block_tables_offset:end].copy_(mirror[self.block_tables_offset:end],
                                                                 non_blocking=True)
        self.mirror_copied[turn].record()
        if not host_ids:
            self.input_ids[:num_tokens].copy_(inputs.input_ids, non_blocking=True)
        if num_in_flight:
            self.input_ids[self.in_flight[:num_in_flight]] = \
                inputs.prev_sampled[self.in_flight_source[:num_in_flight]]
        self.graphs[batch, query_len].replay()
        return self.outputs[batch, query_len][:num_tokens]

    def _pad_verification(self, host: dict[str, np.ndarray], num_reqs: int, num_tokens: int, batch: int,
                          query_start_loc: np.ndarray) -> None:
        """Requests past the real ones: the first holds the spare tokens, attending causally
        to themselves at positions 0.. in block 0 and writing nowhere; the rest have no query
        token and one cached token."""
        graph_tokens = batch * self.spec_query_len
        num_spare = graph_tokens - num_tokens
        host["query_start_loc"][:num_reqs + 1] = query_start_loc
        host["query_start_loc"][num_reqs + 1:batch + 2] = graph_tokens
        host["seq_lens"][num_reqs:batch + 1] = 1
        host["seq_lens"][num_reqs] = max(num_spare, 1)
        host["block_tables"][num_reqs:batch + 1] = 0
        host["slot_mapping"][num_tokens:graph_tokens] = -1
        host["positions"][num_tokens:graph_tokens] = self.arange[:num_spare]
