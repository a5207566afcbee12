"""InputBatch: the model runner's persistent per-request state, one row per request.

Rows live in preallocated numpy arrays (token ids, block table, sampling parameters), so a
step gathers its inputs with a few vectorized indexing operations instead of Python loops
over requests and tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from engine_core.protocol import NewRequestData

_NO_LOGPROBS = -1


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int,
                 eos_token_ids: list[int], device: torch.device) -> None:
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.max_model_len = max_model_len
        self.max_num_reqs = max_num_reqs
        self.req_id_to_row: dict[str, int] = {}
        self.free_rows = list(range(max_num_reqs - 1, -1, -1))
        # +1: a request at max_model_len still stores the token sampled last.
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)

        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)  # 0: disabled
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_logprobs = np.full(max_num_reqs, _NO_LOGPROBS, dtype=np.int64)
        self.num_prompt_logprobs = np.full(max_num_reqs, _NO_LOGPROBS, dtype=np.int64)
        # Rows whose sampling counts their own tokens (SamplingParams.has_penalties), and rows
        # that never speculate (SamplingParams.has_logits_processors, penalties among them).
        self.penalized = np.zeros(max_num_reqs, dtype=bool)
        self.no_spec = np.zeros(max_num_reqs, dtype=bool)
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        self.seed = np.zeros(max_num_reqs, dtype=np.int64)  # read where seeded
        # Sparse, rarely used parameters stay in dicts keyed by row.
        self.generators: dict[int, torch.Generator] = {}  # seeded rows
        self.logit_bias: dict[int, dict[int, float]] = {}
        self.stop_token_ids: dict[int, list[int]] = {}  # rows with min_tokens > 0 only

    def add_request(self, new: NewRequestData) -> None:
        row = self.free_rows.pop()
        self.req_id_to_row[new.request_id] = row
        n = len(new.token_ids)
        self.token_ids[row, :n] = new.token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = new.num_prompt_tokens
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, new.block_ids)

        p = new.sampling_params
        self.temperature[row] = p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = max(p.top_k, 0)
        self.min_p[row] = p.min_p
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.repetition_penalty[row] = p.repetition_penalty
        self.min_tokens[row] = p.min_tokens
        self.num_logprobs[row] = _NO_LOGPROBS if p.logprobs is None else p.logprobs
        self.num_prompt_logprobs[row] = _NO_LOGPROBS if p.prompt_logprobs is None else p.prompt_logprobs
        self.penalized[row] = p.has_penalties
        self.no_spec[row] = p.has_logits_processors
        self.seeded[row] = p.seed is not None
        if p.seed is not None:
            self.seed[row] = p.seed
            self.generators[row] = torch.Generator(device=self.device)
        if p.logit_bias:
            self.logit_bias[row] = p.logit_bias
        if p.min_tokens > 0:
            self.stop_token_ids[row] = list(p.stop_ids(self.eos_token_ids))

    def remove_request(self, request_id: str) -> None:
        row = self.req_id_to_row.pop(request_id, None)
        if row is None:
            return
        for sparse in (self.generators, self.logit_bias, self.stop_token_ids):
            sparse.pop(row, None)
        self.free_rows.append(row)

    def clear(self) -> None:
        """Drop every request, even one half added when a step failed. A row's arrays are all
        rewritten when it is taken again; only the index and the sparse dicts need emptying."""
        self.req_id_to_row.clear()
        self.free_rows = list(range(self.max_num_reqs - 1, -1, -1))
        for sparse in (self.generators, self.logit_bias, self.stop_token_ids):
            sparse.clear()

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)
