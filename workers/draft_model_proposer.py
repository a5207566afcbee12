"""DraftModelProposer: drafts from a smaller model that shares the target's tokenizer.

The draft model has its own paged KV cache tensors but shares the target's block tables and
slot mapping: a block id means the same token positions in both caches, so the engine core
manages one set of blocks. Two rules keep the draft's KV right:

- `prepare` runs the draft over exactly the target's inputs of every step, so each position
  the target computes, the draft computes with the same token (prompt chunks, accepted
  drafts, and rejected ones, whose stale KV both overwrite later alike).
- `propose` then decodes k tokens greedily from each request's last token. Those write KV up
  to k positions past the step's tokens, which the scheduler reserves (`num_lookahead_tokens`),
  and which the next step's `prepare` overwrites with the tokens actually kept.

Greedy drafts are deterministic given the context, so the rejection sampler treats them as
point masses and the target distribution is kept exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.attention import bind_kv_caches
from workers.cuda_graphs import CudaGraphRunner
from workers.input_batch import InputBatch
from workers.step_inputs import StepInputs, block_table_width
from workers.upload import upload


class DraftModelProposer:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], batch: InputBatch, block_size: int,
                 max_num_tokens: int, num_speculative_tokens: int, device: torch.device,
                 use_cuda_graphs: bool) -> None:
        self.model = model
        bind_kv_caches(model, kv_caches)
        self.batch = batch
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.device = device
        # The draft runs the target's step shapes and then k one-token decodes: both replay
        # graphs like the target's, or a small draft would be bound by kernel launches.
        self.cuda_graphs: CudaGraphRunner | None = None
        if use_cuda_graphs and device.type == "cuda":
            max_num_reqs, max_blocks_per_req = batch.block_table.shape
            self.cuda_graphs = CudaGraphRunner(model, max_num_reqs, max_num_tokens, batch.max_model_len,
                                               max_blocks_per_req, device, spec_query_len=1 + num_speculative_tokens)

    def capture_graphs(self) -> None:
        if self.cuda_graphs is not None:
            self.cuda_graphs.capture()

    @torch.inference_mode()
    def prepare(self, inputs: StepInputs, max_query_len: int) -> None:
        self._forward(inputs, max_query_len)

    def _forward(self, inputs: StepInputs, max_query_len: int) -> torch.Tensor:
        shape = self.cuda_graphs.shape_for(inputs.num_reqs, inputs.num_tokens, max_query_len) \
            if self.cuda_graphs else None
        if shape is not None:
            return self.cuda_graphs.run(inputs, shape)
        return self.model(*inputs.upload(self.device))

    @torch.inference_mode()
    def propose(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                max_num_draft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num_draft = np.minimum(max_num_draft, self.k)
        drafts = torch.full((len(rows), self.k), -1, dtype=torch.long, device=self.device)
        # Every request's last token, then its drafts one position at a time; a request leaves
        # the batch once it has its drafts.
        last = num_tokens[rows] - 1
        input_ids = upload([token_ids[rows, last]], self.device)[0]
        for j in range(self.k):
            active = np.flatnonzero(num_draft > j)
            if not len(active):
                break
            active_device = upload([active], self.device)[0]
            hidden = self._forward(self._decode_inputs(rows[active], last[active] + j, input_ids[active_device]), 1)
            next_ids = self.model.compute_logits(hidden).argmax(dim=-1)
            drafts[active_device, j] = next_ids
            input_ids[active_device] = next_ids
        return drafts.cpu().numpy(), num_draft

    def _decode_inputs(self, rows: np.ndarray, positions: np.ndarray, input_ids: torch.Tensor) -> StepInputs:
        """One query token per row at `positions`, attending to everything before it."""
        batch, bs = self.batch, self.block_size
        width = block_table_width(int(positions.max() // bs + 1), batch.block_table.shape[1])
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=batch.block_table[rows, positions // bs].astype(np.int64) * bs + positions % bs,
            query_start_loc=np.arange(len(rows) + 1, dtype=np.int32),
            seq_lens=(positions + 1).astype(np.int32),
            block_tables=batch.block_table[rows, :width],
        )
