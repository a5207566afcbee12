"""StepInputs: a forward pass's inputs as host arrays, before they reach the device.

The model runner (and a draft model mirroring it) builds them with numpy. An eager step uploads
them in one copy (`upload`); a CUDA-graph step writes them straight into the graph's pinned
input mirror (`workers.cuda_graphs`), so neither path allocates device tensors per array.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from workers.attention import AttentionMetadata
from workers.upload import upload


def block_table_width(num_blocks: int, max_width: int) -> int:
    """The block-table columns a step passes for requests of up to `num_blocks` blocks, rounded
    up to a multiple of 16: Triton specializes integer arguments, the block table's row stride
    among them, on divisibility by 16, so every step keeps to the kernels compiled at warm-up."""
    return min(-(-num_blocks // 16) * 16, max_width)


@dataclass
class StepInputs:
    # [T] int64, or a device tensor when the tokens are there already (a draft model's own
    # greedy tokens, fed back one position at a time).
    input_ids: np.ndarray | torch.Tensor
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32
    block_tables: np.ndarray  # [R, W] int32
    # Token positions whose id the previous step is still sampling on the device (async
    # scheduling), and where each is in that step's sampled ids `prev_sampled`.
    in_flight: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    in_flight_source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prev_sampled: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    def upload(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and attention metadata on the device, in one copy."""
        host_ids = isinstance(self.input_ids, np.ndarray)
        arrays = [self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables,
                  self.in_flight, self.in_flight_source] + ([self.input_ids] if host_ids else [])
        positions, slot_mapping, query_start_loc, seq_lens, block_tables, in_flight, source, *ids = \
            upload(arrays, device)
        input_ids = ids[0] if host_ids else self.input_ids
        if len(self.in_flight):
            input_ids[in_flight] = self.prev_sampled[source]
        return input_ids, positions, AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                                                       seq_lens=seq_lens, block_tables=block_tables)
