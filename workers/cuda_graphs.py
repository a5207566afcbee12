"""CUDA graphs for every step up to a size.

A step launches a few hundred small kernels. Launched one by one from Python, they cost the
host about 20 ms per forward of a 30-layer model, more than the GPU work of any step below a
few thousand tokens. Graphs are captured once per shape of a ladder; a step pads up to the
next captured shape, copies its inputs into the graph's static buffers and replays. Two kinds:

- Decode graphs (one query token per request) at batch sizes 1, 2, 4, 8, 16, ... up to
  `max_num_seqs`. Padding requests write nowhere (slot -1) and attend to one cached token.
- Padded graphs for every other step (prompt chunks, mixed batches, draft verification) at
  (requests, tokens) shapes: powers of two of each, and with speculative decoding the
  verification shapes of `1 + k` tokens per request. The spare tokens go to one padding
  request past the real ones, attending causally to themselves at positions 0.. in block 0 and
  writing nowhere; the requests after it have no query tokens. So each request keeps its own
  query length and the graph its shapes.

Steps of more than `MAX_PADDED_GRAPH_TOKENS` tokens run eagerly: their GPU work is of the order
of the launches' cost, and padding them up to a power of two would cost more GPU time than
the launches do. The graphs share one memory pool, the activations of the largest, which the
KV cache's sizing leaves to `gpu_memory_utilization`'s headroom.

A step's inputs reach the graph in two host-to-device copies: the host writes them with numpy
into a pinned mirror of the graph's input buffer (padding included), and the copies move the
small arrays and the block-table rows in use. Per-array device tensors and copies would cost
the host more than the small batches' whole GPU step.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from workers.attention import AttentionMetadata
from workers.step_inputs import StepInputs
from workers.upload import aligned, torch_dtype


MAX_PADDED_GRAPH_TOKENS = 2048
# Host mirrors of the input buffer, used in turn: one is written while the last one's copies
# may still wait in the stream.
_NUM_MIRRORS = 2


class GraphShape(NamedTuple):
    num_reqs: int  # requests the graph holds, padding request excluded
    num_tokens: int
    decode: bool  # one query token per request


def decode_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8)) + list(range(272, 1024 + 1, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


def _powers_of_two(start: int, end: int) -> list[int]:
    """start, 2 * start, 4 * start, ... below end, then end."""
    sizes = []
    while start < end:
        sizes.append(start)
        start *= 2
    return sizes + [end]


def padded_shapes(max_num_seqs: int, max_num_tokens: int, max_model_len: int,
                  spec_query_len: int) -> list[GraphShape]:
    """The padded graphs' shapes, fewest tokens first. None holds more than max_model_len
    tokens, so that the padding request's tokens always fit in one sequence."""
    max_tokens = min(max_num_tokens, max_model_len, MAX_PADDED_GRAPH_TOKENS)
    token_sizes = _powers_of_two(16, max_tokens) if max_tokens > 16 else [max_tokens]
    # A step has at least a token per request: more requests than max_tokens never fit.
    req_sizes = _powers_of_two(1, min(max_num_seqs, max_tokens))
    shapes = {(r, t) for r in req_sizes for t in token_sizes if r <= t}
    if spec_query_len > 1:
        shapes |= {(b, b * spec_query_len) for b in decode_sizes(max_num_seqs) if b * spec_query_len <= max_tokens}
    return [GraphShape(r, t, False) for t, r in sorted((t, r) for r, t in shapes)]


def fit_padded_shape(shapes: list[GraphShape], num_reqs: int, num_tokens: int) -> GraphShape | None:
    """The first of `shapes` (fewest tokens first) that holds the step, or None."""
    first = bisect.bisect_left(shapes, num_tokens, key=lambda shape: shape.num_tokens)
    return next((shape for shape in shapes[first:] if shape.num_reqs >= num_reqs), None)


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_num_tokens: int, max_model_len: int,
                 max_blocks_per_req: int, device: torch.device, spec_query_len: int = 1) -> None:
        self.model = model
        self.decode_sizes = decode_sizes(max_num_seqs)
        self.padded_shapes = padded_shapes(max_num_seqs, max_num_tokens, max_model_len, spec_query_len)
        n = max_num_seqs
        num_tokens = max(n, self.padded_shapes[-1].num_tokens)
        # The input buffer a replay reads. One request more than the largest batch: the padding
        # request of padded graphs. The block table comes last, so that a step copies only the
        # rows its graph reads.
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
        self.stream = torch.cuda.current_stream(device)  # named once: the lookup costs the host a step
        self.num_runs = 0
        self.arange = np.arange(num_tokens + n + 2)
        self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphShape, torch.Tensor] = {}

    def _device_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buffer[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(torch_dtype(dtype)).view(shape)
                for name, (offset, dtype, shape) in self.layout.items()}

    def _host_views(self, buffer: torch.Tensor) -> dict[str, np.ndarray]:
        data = buffer.numpy()
        return {name: data[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
                for name, (offset, dtype, shape) in self.layout.items()}

    def _forward(self, shape: GraphShape) -> torch.Tensor:
        num_reqs = shape.num_reqs + (not shape.decode)  # the padding request
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:shape.num_tokens],
            query_start_loc=self.query_start_loc[:num_reqs + 1],
            seq_lens=self.seq_lens[:num_reqs],
            block_tables=self.block_tables[:num_reqs],
        )
        if shape.decode:
            # Sorted inside the graph, on each replay's sequence lengths.
            metadata.decode_order = torch.argsort(metadata.seq_lens, descending=True)
        return self.model(self.input_ids[:shape.num_tokens], self.positions[:shape.num_tokens], metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        shapes = [GraphShape(batch, batch, True) for batch in self.decode_sizes] + self.padded_shapes
        self.slot_mapping.fill_(-1)  # capture-time forwards write nowhere
        # Largest first: smaller graphs then reuse the big one's memory pool.
        for shape in sorted(shapes, key=lambda shape: shape.num_tokens, reverse=True):
            # Capture-time inputs: one token per request, the rest to the padding request.
            num_reqs = shape.num_reqs + (not shape.decode)
            self.query_start_loc[:num_reqs].copy_(torch.arange(num_reqs))
            self.query_start_loc[num_reqs] = shape.num_tokens
            self.seq_lens[:num_reqs] = (self.query_start_loc[1:num_reqs + 1] - self.query_start_loc[:num_reqs]).clamp(min=1)
            self._forward(shape)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape] = self._forward(shape)
            self.graphs[shape] = graph
        torch.cuda.synchronize()

    def shape_for(self, num_reqs: int, num_tokens: int, max_query_len: int) -> GraphShape | None:
        """The captured graph a step of this size replays, or None to run it eagerly."""
        if not self.graphs:
            return None  # not captured yet (the warm-up runs eagerly)
        if max_query_len == 1:
            if num_reqs > self.decode_sizes[-1]:
                return None
            batch = self.decode_sizes[bisect.bisect_left(self.decode_sizes, num_reqs)]
            return GraphShape(batch, batch, True)
        return fit_padded_shape(self.padded_shapes, num_reqs, num_tokens)

    def run(self, inputs: StepInputs, shape: GraphShape) -> torch.Tensor:
        num_tokens, num_reqs = inputs.num_tokens, inputs.num_reqs
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
        if shape.decode:
            host["query_start_loc"][:shape.num_reqs + 1] = self.arange[:shape.num_reqs + 1]
            # Padding rows write nowhere (slot -1) and attend to one cached token.
            host["slot_mapping"][num_reqs:shape.num_reqs] = -1
            host["seq_lens"][num_reqs:shape.num_reqs] = 1
        else:
            self._pad(host, num_reqs, num_tokens, shape, inputs.query_start_loc)
        mirror = self.mirrors[turn]
        end = self.block_tables_offset + (shape.num_reqs + 1) * self.block_table_row_bytes
        self.device_buffer[:self.block_tables_offset].copy_(mirror[:self.block_tables_offset], non_blocking=True)
        self.device_buffer[self.block_tables_offset:end].copy_(mirror[self.block_tables_offset:end],
                                                                 non_blocking=True)
        self.mirror_copied[turn].record(self.stream)
        if not host_ids:
            self.input_ids[:num_tokens].copy_(inputs.input_ids, non_blocking=True)
        if num_in_flight:
            self.input_ids[self.in_flight[:num_in_flight]] = \
                inputs.prev_sampled[self.in_flight_source[:num_in_flight]]
        self.graphs[shape].replay()
        return self.outputs[shape][:num_tokens]

    def _pad(self, host: dict[str, np.ndarray], num_reqs: int, num_tokens: int, shape: GraphShape,
             query_start_loc: np.ndarray) -> None:
        """Requests past the real ones: the first holds the spare tokens, attending causally
        to themselves at positions 0.. in block 0 and writing nowhere; the rest have no query
        token and one cached token."""
        num_spare = shape.num_tokens - num_tokens
        host["query_start_loc"][:num_reqs + 1] = query_start_loc
        host["query_start_loc"][num_reqs + 1:shape.num_reqs + 2] = shape.num_tokens
        host["seq_lens"][num_reqs:shape.num_reqs + 1] = 1
        host["seq_lens"][num_reqs] = max(num_spare, 1)
        host["block_tables"][num_reqs:shape.num_reqs + 1] = 0
        host["slot_mapping"][num_tokens:shape.num_tokens] = -1
        host["positions"][num_tokens:shape.num_tokens] = self.arange[:num_spare]
