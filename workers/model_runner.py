"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

Per step: update the persistent batch from the scheduler's deltas, gather input ids,
positions and attention metadata with vectorized numpy, run the model once over the mixed
batch (prefill chunks and decodes together), and sample for requests whose prompt is done.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine_core.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from workers.attention import AttentionMetadata
from workers.cuda_graphs import CudaGraphRunner
from workers.input_batch import InputBatch
from workers.sampler import Sampler, SamplingMetadata, compute_logprobs_rows

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


class ModelRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 max_num_reqs: int, max_model_len: int, vocab_size: int,
                 eos_token_ids: list[int], device: torch.device, use_cuda_graphs: bool) -> None:
        self.model = model
        self.kv_caches = kv_caches
        for layer, kv_cache in zip(model.attention_layers(), kv_caches):
            layer.kv_cache = kv_cache
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        max_blocks_per_req = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_reqs, max_model_len, max_blocks_per_req, eos_token_ids, device)
        self.sampler = Sampler()
        self.cuda_graphs: CudaGraphRunner | None = None
        if device.type == "cuda":
            self.warm_up()
        if use_cuda_graphs and device.type == "cuda":
            self.cuda_graphs = CudaGraphRunner(model, max_num_reqs, max_blocks_per_req, device)
            self.cuda_graphs.capture()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run eager steps of a few shapes so that every Triton kernel variant they need
        (specialized on 1, multiples of 16, or neither) compiles now rather than mid-serving."""
        width = min(16, self.batch.block_table.shape[1])
        for num_reqs, tokens_per_req in ((1, 17), (2, 8), (3, 5), (16, 16), (16, 1), (3, 1)):
            num_tokens = num_reqs * tokens_per_req
            metadata = AttentionMetadata(
                slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
                query_start_loc=torch.arange(0, num_tokens + 1, tokens_per_req, dtype=torch.int32,
                                             device=self.device),
                seq_lens=torch.full((num_reqs,), tokens_per_req, dtype=torch.int32, device=self.device),
                block_tables=torch.zeros(num_reqs, width, dtype=torch.int32, device=self.device),
                max_query_len=tokens_per_req,
                max_seq_len=tokens_per_req,
            )
            positions = torch.arange(tokens_per_req, device=self.device).repeat(num_reqs)
            hidden = self.model(torch.zeros_like(positions), positions, metadata)
            self.model.compute_logits(hidden[:num_reqs]).argmax(dim=-1)
        torch.cuda.synchronize(self.device)

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.batch
        for request_id in scheduler_output.finished_request_ids:
            batch.remove_request(request_id)
        for new in scheduler_output.new_requests:
            batch.add_request(new)
        cached = scheduler_output.cached_requests
        for request_id, block_ids, num_computed in zip(cached.request_ids, cached.new_block_ids,
                                                       cached.num_computed_tokens):
            row = batch.req_id_to_row[request_id]
            batch.num_computed_tokens[row] = num_computed
            if block_ids:
                batch.append_blocks(row, block_ids)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[])
        batch = self.batch
        request_ids = list(scheduler_output.num_scheduled_tokens)
        rows = np.fromiter((batch.req_id_to_row[r] for r in request_ids), np.int64, len(request_ids))
        num_scheduled = np.fromiter(scheduler_output.num_scheduled_tokens.values(), np.int64, len(rows))

        # Token t of the step belongs to request req_index[t] at position positions[t].
        cu_num_tokens = np.cumsum(num_scheduled)
        num_computed = batch.num_computed_tokens[rows]
        req_index = np.repeat(rows, num_scheduled)
        positions = np.arange(cu_num_tokens[-1]) + np.repeat(num_computed - (cu_num_tokens - num_scheduled),
                                                             num_scheduled)
        input_ids = batch.token_ids[req_index, positions]
        block_ids = batch.block_table[req_index, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        seq_lens = num_computed + num_scheduled
        # Triton specializes integer arguments on divisibility by 16, the block table's row
        # stride among them: a width rounded up to 16 keeps every step on compiled kernels.
        max_blocks = min(-(-int(batch.num_blocks[rows].max()) // 16) * 16, batch.block_table.shape[1])

        to_device = self._to_device
        attn_metadata = AttentionMetadata(
            slot_mapping=to_device(slot_mapping),
            query_start_loc=to_device(np.concatenate(([0], cu_num_tokens)).astype(np.int32)),
            seq_lens=to_device(seq_lens.astype(np.int32)),
            block_tables=to_device(batch.block_table[rows, :max_blocks]),
            max_query_len=int(num_scheduled.max()),
            max_seq_len=int(seq_lens.max()),
        )
        if self.cuda_graphs is not None and attn_metadata.max_query_len == 1 \
                and self.cuda_graphs.can_run(len(rows)):
            hidden = self.cuda_graphs.run(to_device(input_ids), to_device(positions), attn_metadata)
        else:
            hidden = self.model(to_device(input_ids), to_device(positions), attn_metadata)

        # Requests whose computed tokens caught up with their tokens sample a new one; the
        # others were mid-prefill.
        sampling = seq_lens >= batch.num_tokens[rows]
        prompt_logprobs = self._prompt_logprobs(hidden, rows, num_computed, num_scheduled,
                                                cu_num_tokens, request_ids)
        if not sampling.any():
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[], prompt_logprobs=prompt_logprobs)
        sample_rows = rows[sampling]
        logits = self.model.compute_logits(hidden[to_device(cu_num_tokens[sampling] - 1)])
        out = self.sampler(logits, self._sampling_metadata(sample_rows))

        sampled = out.sampled_token_ids.cpu().numpy()
        batch.token_ids[sample_rows, batch.num_tokens[sample_rows]] = sampled
        batch.num_tokens[sample_rows] += 1
        sample_ids = [request_ids[i] for i in np.flatnonzero(sampling)]
        return ModelRunnerOutput(
            request_ids=sample_ids,
            sampled_token_ids=[[t] for t in sampled.tolist()],
            logprobs=self._sampled_logprobs(out, sample_rows, sample_ids),
            prompt_logprobs=prompt_logprobs,
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        b = self.batch
        to_device = self._to_device
        temperature = b.temperature[rows]
        top_k = b.top_k[rows]
        top_p = b.top_p[rows]
        min_p = b.min_p[rows]
        presence, frequency, repetition = (b.presence_penalty[rows], b.frequency_penalty[rows],
                                           b.repetition_penalty[rows])
        any_penalty = presence.any() or frequency.any() or (repetition != 1.0).any()
        output_counts = prompt_mask = None
        if any_penalty:
            output_counts, prompt_mask = self._token_counts(rows)

        row_of = {int(r): i for i, r in enumerate(rows)}
        generators: dict[int, torch.Generator] = {}
        for row, seed in b.seeds.items():
            if row in row_of:
                num_output = int(b.num_tokens[row] - b.num_prompt_tokens[row])
                generator = b.generators[row]
                generator.manual_seed((seed + num_output * _SEED_MIX) % (1 << 63))
                generators[row_of[row]] = generator

        bias_rows, bias_ids, bias_values = [], [], []
        for row, bias in b.logit_bias.items():
            if row in row_of:
                bias_rows += [row_of[row]] * len(bias)
                bias_ids += list(bias)
                bias_values += list(bias.values())
        ban_rows, ban_ids = [], []
        for row, stop_ids in b.stop_token_ids.items():
            if row in row_of and b.num_tokens[row] - b.num_prompt_tokens[row] < b.min_tokens[row]:
                ban_rows += [row_of[row]] * len(stop_ids)
                ban_ids += stop_ids

        def optional(values: list, dtype: torch.dtype) -> torch.Tensor | None:
            return torch.tensor(values, dtype=dtype, device=self.device) if values else None

        return SamplingMetadata(
            temperature=to_device(temperature),
            all_greedy=bool((temperature < 1e-5).all()),
            top_p=to_device(top_p) if (top_p < 1.0).any() else None,
            top_k=to_device(np.where((top_k > 0) & (top_k < self.vocab_size), top_k, self.vocab_size))
            if ((top_k > 0) & (top_k < self.vocab_size)).any() else None,
            min_p=to_device(min_p) if min_p.any() else None,
            generators=generators,
            presence_penalty=to_device(presence) if presence.any() else None,
            frequency_penalty=to_device(frequency) if frequency.any() else None,
            repetition_penalty=to_device(repetition) if (repetition != 1.0).any() else None,
            output_token_counts=output_counts,
            prompt_token_mask=prompt_mask,
            bias_rows=optional(bias_rows, torch.int64),
            bias_token_ids=optional(bias_ids, torch.int64),
            bias_values=optional(bias_values, torch.float32),
            ban_rows=optional(ban_rows, torch.int64),
            ban_token_ids=optional(ban_ids, torch.int64),
            max_num_logprobs=int(b.num_logprobs[rows].max()),
        )

    def _token_counts(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: how often each vocab token occurs in the output, and which occur in the prompt."""
        b = self.batch
        width = int(b.num_tokens[rows].max())
        tokens = torch.from_numpy(b.token_ids[rows, :width]).to(self.device)
        pos = torch.arange(width, device=self.device).unsqueeze(0)
        num_prompt = self._to_device(b.num_prompt_tokens[rows]).unsqueeze(1)
        num_tokens = self._to_device(b.num_tokens[rows]).unsqueeze(1)
        is_output = (pos >= num_prompt) & (pos < num_tokens)
        counts = torch.zeros(len(rows), self.vocab_size, device=self.device)
        counts.scatter_add_(1, tokens, is_output.float())
        prompt_mask = torch.zeros(len(rows), self.vocab_size, device=self.device)
        prompt_mask.scatter_add_(1, tokens, (pos < num_prompt).float())
        return counts, prompt_mask > 0

    def _sampled_logprobs(self, out, rows: np.ndarray, request_ids: list[str]) -> dict[str, Logprobs]:
        if out.logprobs is None:
            return {}
        ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        result = {}
        for i, (row, request_id) in enumerate(zip(rows.tolist(), request_ids)):
            k = int(self.batch.num_logprobs[row])
            if k >= 0:
                result[request_id] = Logprobs(token_ids=[ids[i][:1 + k]], logprobs=[lps[i][:1 + k]],
                                              ranks=[ranks[i]])
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: np.ndarray, num_computed: np.ndarray,
                         num_scheduled: np.ndarray, cu_num_tokens: np.ndarray,
                         request_ids: list[str]) -> dict[str, Logprobs]:
        """Logprobs of each prompt token given those before it, for requests that ask."""
        b = self.batch
        result = {}
        for i in np.flatnonzero(b.num_prompt_logprobs[rows] >= 0):
            row = rows[i]
            # Position p predicts token p + 1, which must still be a prompt token.
            start = num_computed[i]
            end = min(start + num_scheduled[i], b.num_prompt_tokens[row] - 1)
            if end <= start:
                continue
            first = cu_num_tokens[i] - num_scheduled[i]
            logits = self.model.compute_logits(hidden[first:first + end - start])
            targets = self._to_device(b.token_ids[row, start + 1:end + 1])
            ids, lps, ranks = compute_logprobs_rows(logits.log_softmax(-1), targets,
                                                    int(b.num_prompt_logprobs[row]))
            result[request_ids[i]] = Logprobs(token_ids=ids.tolist(), logprobs=lps.tolist(),
                                              ranks=ranks.tolist())
        return result
