"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

Per step: update the persistent batch from the scheduler's deltas, gather input ids,
positions and attention metadata with vectorized numpy, run the model once over the mixed
batch (prefill chunks and decodes together), and sample for requests whose prompt is done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine_core.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from kernels import ops
from workers.attention import AttentionMetadata
from workers.cuda_graphs import CudaGraphRunner
from workers.input_batch import InputBatch
from workers.sampler import Sampler, SamplerOutput, SamplingMetadata, compute_logprobs_rows

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


@dataclass
class PendingStep:
    """A launched step: what `collect` needs once the device is done."""

    request_ids: list[str]  # requests that sample, in batch order
    rows: np.ndarray  # their rows at launch
    sampled_host: torch.Tensor | None  # pinned host copy of the sampled ids, filled asynchronously
    ready: torch.cuda.Event | None  # recorded after that copy; None on the CPU
    sampler_output: SamplerOutput | None
    num_logprobs: list[int]  # per sampling request, -1 for none
    prompt_logprobs: dict[str, Logprobs]
    written: bool = False  # sampled ids appended to the batch's host token ids


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
        self.pending: deque[PendingStep] = deque()
        # The last launched step's sampled tokens (on the device) and each row's index in them.
        self.prev_sampled = torch.zeros(0, dtype=torch.long, device=device)
        self.prev_sampled_index = np.full(max_num_reqs, -1, dtype=np.int64)
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
            )
            positions = torch.arange(tokens_per_req, device=self.device).repeat(num_reqs)
            hidden = self.model(torch.zeros_like(positions), positions, metadata)
            logits = self.model.compute_logits(hidden[:num_reqs], float32=False)
            # Greedy and sampled rows, so the sampling kernel compiles now too.
            temperature = torch.tensor([0.0, 1.0] * num_reqs, device=self.device)[:num_reqs]
            ops.sample_gumbel(logits, temperature, torch.arange(num_reqs, device=self.device))
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
    def launch(self, scheduler_output: SchedulerOutput) -> None:
        """Enqueue the step's forward and sampling on the device without waiting for them;
        `collect` returns their result. Requests decoding right after a step still in flight
        get that step's sampled token on the device, never through the host."""
        self.update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            self.pending.append(PendingStep([], np.empty(0, np.int64), None, None, None, [], {}))
            return
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
        )
        input_ids_device = to_device(input_ids)
        # Positions past the host's known tokens hold tokens the previous step is sampling.
        in_flight = np.flatnonzero(positions >= batch.num_tokens[req_index])
        if len(in_flight):
            source = self.prev_sampled_index[req_index[in_flight]]
            input_ids_device[to_device(in_flight)] = self.prev_sampled[to_device(source)]
        if self.cuda_graphs is not None and num_scheduled.max() == 1 \
                and self.cuda_graphs.can_run(len(rows)):
            hidden = self.cuda_graphs.run(input_ids_device, to_device(positions), attn_metadata)
        else:
            hidden = self.model(input_ids_device, to_device(positions), attn_metadata)

        # Requests whose computed tokens caught up with their tokens sample a new one; the
        # others were mid-prefill.
        sampling = seq_lens >= batch.num_tokens[rows]
        prompt_logprobs = self._prompt_logprobs(hidden, rows, num_computed, num_scheduled,
                                                cu_num_tokens, request_ids)
        sample_rows = rows[sampling]
        sample_ids = [request_ids[i] for i in np.flatnonzero(sampling)]
        if not len(sample_rows):
            self.pending.append(PendingStep([], sample_rows, None, None, None, [], prompt_logprobs))
            return
        # Logits stay in the model's dtype: the fused sampling kernel reads them as they are.
        logits = self.model.compute_logits(hidden[to_device(cu_num_tokens[sampling] - 1)], float32=False)
        out = self.sampler(logits, self._sampling_metadata(sample_rows, seq_lens[sampling]))

        self.prev_sampled = out.sampled_token_ids
        self.prev_sampled_index.fill(-1)
        self.prev_sampled_index[sample_rows] = np.arange(len(sample_rows))
        sampled_host = torch.empty(len(sample_rows), dtype=torch.long, pin_memory=self.device.type == "cuda")
        sampled_host.copy_(out.sampled_token_ids, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.pending.append(PendingStep(sample_ids, sample_rows, sampled_host, ready, out,
                                        batch.num_logprobs[sample_rows].tolist(), prompt_logprobs))

    def collect(self) -> ModelRunnerOutput:
        """The oldest launched step's result, waiting for the device if it is still running."""
        step = self.pending.popleft()
        self._write_back(step)
        sampled = step.sampled_host.tolist() if step.sampled_host is not None else []
        return ModelRunnerOutput(
            request_ids=step.request_ids,
            sampled_token_ids=[[t] for t in sampled],
            logprobs=self._sampled_logprobs(step),
            prompt_logprobs=step.prompt_logprobs,
        )

    def _write_back(self, step: PendingStep) -> None:
        """Append the step's sampled tokens to the host copy of each request's tokens (once;
        requests dropped or replaced since the launch are skipped)."""
        if step.written or step.sampled_host is None:
            return
        if step.ready is not None:
            step.ready.synchronize()
        step.written = True
        batch = self.batch
        live = np.fromiter((batch.req_id_to_row.get(r, -1) == row for r, row in zip(step.request_ids, step.rows)),
                           bool, len(step.rows))
        rows = step.rows[live]
        batch.token_ids[rows, batch.num_tokens[rows]] = step.sampled_host.numpy()[live]
        batch.num_tokens[rows] += 1

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _sampling_metadata(self, rows: np.ndarray, seq_lens: np.ndarray) -> SamplingMetadata:
        """seq_lens: each row's tokens up to the one it samples after. Output counts derive
        from it rather than from the host's tokens, which may lag a step in flight."""
        b = self.batch
        num_output = seq_lens - b.num_prompt_tokens[rows]
        to_device = self._to_device
        temperature = b.temperature[rows]
        greedy = temperature < 1e-5
        top_k = b.top_k[rows]
        uses_top_k = (top_k > 0) & (top_k < self.vocab_size)
        top_p = b.top_p[rows]
        min_p = b.min_p[rows]
        presence, frequency, repetition = (b.presence_penalty[rows], b.frequency_penalty[rows],
                                           b.repetition_penalty[rows])
        penalized = (presence != 0) | (frequency != 0) | (repetition != 1.0)
        output_counts = prompt_mask = None
        if penalized.any():
            # Penalties read the tokens themselves: wait for the ones still in flight.
            for step in self.pending:
                self._write_back(step)
            output_counts, prompt_mask = self._token_counts(rows)

        row_of = {int(r): i for i, r in enumerate(rows)}
        bias_rows, bias_ids, bias_values = [], [], []
        for row, bias in b.logit_bias.items():
            if row in row_of:
                bias_rows += [row_of[row]] * len(bias)
                bias_ids += list(bias)
                bias_values += list(bias.values())
        ban_rows, ban_ids = [], []
        for row, stop_ids in b.stop_token_ids.items():
            if row in row_of and num_output[row_of[row]] < b.min_tokens[row]:
                ban_rows += [row_of[row]] * len(stop_ids)
                ban_ids += stop_ids

        # On CUDA the fused kernel samples the rows that need no logits processor; truncation
        # (top-k, top-p, min-p) never changes a greedy row's argmax.
        needs_torch = penalized | (~greedy & (uses_top_k | (top_p < 1.0) | (min_p > 0)))
        needs_torch[bias_rows + ban_rows] = True
        fused = self.device.type == "cuda" and not needs_torch.all()
        # One draw for every row's key; seeded rows' keys are overwritten below.
        seeds = torch.randint(0, (1 << 63) - 1, (len(rows),), dtype=torch.int64).numpy() if fused else None
        generators: dict[int, torch.Generator] = {}
        for row, seed in b.seeds.items():
            if row in row_of:
                i = row_of[row]
                key = (seed + int(num_output[i]) * _SEED_MIX) % (1 << 63)
                if fused:
                    seeds[i] = key
                if not fused or needs_torch[i]:
                    generator = b.generators[row]
                    generator.manual_seed(key)
                    generators[i] = generator

        def optional(values: list, dtype: torch.dtype) -> torch.Tensor | None:
            return torch.tensor(values, dtype=dtype, device=self.device) if values else None

        return SamplingMetadata(
            temperature=to_device(temperature),
            all_greedy=bool(greedy.all()),
            top_p=to_device(top_p) if (top_p < 1.0).any() else None,
            top_k=to_device(np.where(uses_top_k, top_k, self.vocab_size)) if uses_top_k.any() else None,
            min_p=to_device(min_p) if min_p.any() else None,
            generators=generators,
            seeds=to_device(seeds) if fused else None,
            torch_rows=to_device(needs_torch) if fused and needs_torch.any() else None,
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

    def _sampled_logprobs(self, step: PendingStep) -> dict[str, Logprobs]:
        out = step.sampler_output
        if out is None or out.logprobs is None:
            return {}
        ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        return {
            request_id: Logprobs(token_ids=[ids[i][:1 + k]], logprobs=[lps[i][:1 + k]], ranks=[ranks[i]])
            for i, (request_id, k) in enumerate(zip(step.request_ids, step.num_logprobs)) if k >= 0
        }

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
