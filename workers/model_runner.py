"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

Per step: update the persistent batch from the scheduler's deltas, gather input ids,
positions and attention metadata with vectorized numpy, run the model once over the mixed
batch (prefill chunks and decodes together), and sample for requests whose prompt is done.

With speculative decoding a request's draft tokens ride along as extra query tokens after its
last token: the step computes logits at the last token and at every draft, samples each
position, and the rejection sampler keeps the accepted drafts plus one token. After the step
the proposer drafts the next tokens from what is now known.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine_core.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from kernels import ops
from workers.attention import bind_kv_caches
from workers.cuda_graphs import CudaGraphRunner
from workers.input_batch import InputBatch
from workers.sampler import Sampler, SamplerOutput, SamplingMetadata, compute_logprobs_rows
from workers.spec_decode import DraftProposer, SpecLayout, accept_greedy, emitted_per_row, verify_drafts
from workers.step_inputs import StepInputs, block_table_width
from workers.upload import upload

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits
_SAMPLED_HOST_BUFFERS = 4


def _seed_key(seed: int, num_output: int) -> int:
    """The random key of a seeded request's sample at one output position: its tokens then
    depend neither on the batch around it nor on preemption."""
    return (seed + num_output * _SEED_MIX) % (1 << 63)


@dataclass
class PendingStep:
    """A launched step: what `collect` needs once the device is done."""

    request_ids: list[str]  # requests that sample, in batch order
    rows: np.ndarray  # their rows at launch
    # Pinned host copy of the sampled ids, filled asynchronously: [requests, 1 + max drafts],
    # each row the request's new tokens padded with -1 (or, with greedy_draft_token_ids, the
    # argmax at every logits row).
    sampled_host: torch.Tensor | None
    ready: torch.cuda.Event | None  # recorded after that copy; None on the CPU
    sampler_output: SamplerOutput | None
    num_logprobs: list[int]  # per sampling request, -1 for none
    prompt_logprobs: dict[str, Logprobs]
    propose_drafts: bool = False
    spec_layout: SpecLayout | None = None  # with drafts verified this step
    # Drafts of an all-greedy step, verified on the host once sampled_host (then the argmax at
    # every logits row) is there.
    greedy_draft_token_ids: np.ndarray | None = None
    tokens: np.ndarray | None = None  # the new tokens, [requests, 1 + max drafts], once known
    written: bool = False  # sampled ids appended to the batch's host token ids


class ModelRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 max_num_reqs: int, max_num_tokens: int, max_model_len: int, vocab_size: int,
                 eos_token_ids: list[int], device: torch.device, use_cuda_graphs: bool,
                 num_speculative_tokens: int = 0,
                 make_proposer: Callable[[InputBatch], DraftProposer] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        bind_kv_caches(model, kv_caches)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        max_blocks_per_req = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_reqs, max_model_len, max_blocks_per_req, eos_token_ids, device)
        self.sampler = Sampler()
        self.max_model_len = max_model_len
        self.proposer = make_proposer(self.batch) if make_proposer is not None else None
        self.pending: deque[PendingStep] = deque()
        # Pinned buffers the sampled ids come back in, used in turn: a step's buffer is reused
        # only after that step is collected (the engine keeps at most two in flight).
        self.sampled_host = [torch.empty(max_num_reqs * (1 + num_speculative_tokens), dtype=torch.long,
                                         pin_memory=device.type == "cuda") for _ in range(_SAMPLED_HOST_BUFFERS)]
        self.num_launched = 0
        # The last launched step's sampled tokens (on the device) and each row's index in them.
        self.prev_sampled = torch.zeros(0, dtype=torch.long, device=device)
        self.prev_sampled_index = np.full(max_num_reqs, -1, dtype=np.int64)
        self.cuda_graphs: CudaGraphRunner | None = None
        if device.type == "cuda":
            self.warm_up()
        if use_cuda_graphs and device.type == "cuda":
            self.cuda_graphs = CudaGraphRunner(model, max_num_reqs, max_num_tokens, max_model_len,
                                               max_blocks_per_req, device,
                                               spec_query_len=1 + num_speculative_tokens)
            self.cuda_graphs.capture()
            if self.proposer is not None:
                self.proposer.capture_graphs()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run eager steps of a few shapes so that every Triton kernel variant they need
        (specialized on 1, multiples of 16, or neither) compiles now rather than mid-serving."""
        width = block_table_width(1, self.batch.block_table.shape[1])
        for num_reqs, tokens_per_req in ((1, 17), (2, 8), (3, 5), (16, 16), (16, 1), (3, 1)):
            num_tokens = num_reqs * tokens_per_req
            inputs = StepInputs(
                input_ids=np.zeros(num_tokens, dtype=np.int64),
                positions=np.tile(np.arange(tokens_per_req), num_reqs),
                slot_mapping=np.full(num_tokens, -1, dtype=np.int64),
                query_start_loc=np.arange(0, num_tokens + 1, tokens_per_req, dtype=np.int32),
                seq_lens=np.full(num_reqs, tokens_per_req, dtype=np.int32),
                block_tables=np.zeros((num_reqs, width), dtype=np.int32),
            )
            hidden = self.model(*inputs.upload(self.device))
            if self.proposer is not None:
                self.proposer.prepare(inputs, tokens_per_req)
            logits = self.model.compute_logits(hidden[:num_reqs], float32=False)
            # Greedy and sampled rows, so the sampling kernel compiles now too.
            temperature = torch.tensor([0.0, 1.0] * num_reqs, device=self.device)[:num_reqs]
            keys = torch.arange(num_reqs, device=self.device)
            sampled = ops.sample_gumbel(logits, temperature, keys)
            if self.proposer is not None:
                # One draft per request, verified by the rejection kernel.
                ops.rejection_sample(sampled, torch.arange(num_reqs + 1, dtype=torch.int32, device=self.device),
                                     logits.float().softmax(dim=-1), None, sampled, temperature == 0, keys, 1)
        torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Forget every request and every step in flight, after a step failed part way (its
        changes to the batch may be half applied). The scheduler resends the requests it
        keeps as new ones, recomputed from their tokens."""
        if self.device.type == "cuda":
            # The dropped steps' queued copies must land before their buffers are reused; and
            # a broken device raises here, which must take the engine down, not one request.
            torch.cuda.synchronize(self.device)
        self.pending.clear()
        self.batch.clear()
        self.prev_sampled = torch.zeros(0, dtype=torch.long, device=self.device)
        self.prev_sampled_index.fill(-1)

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
        num_draft = self._place_drafts(scheduler_output.scheduled_spec_token_ids, request_ids, rows)

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
        max_blocks = block_table_width(int(batch.num_blocks[rows].max()), batch.block_table.shape[1])

        # Positions past the host's known tokens (and drafts) hold tokens the previous step is
        # sampling.
        in_flight = np.flatnonzero(positions >= batch.num_tokens[req_index] + np.repeat(num_draft, num_scheduled))
        source = self.prev_sampled_index[req_index[in_flight]]

        inputs = StepInputs(input_ids, positions, slot_mapping, np.concatenate(([0], cu_num_tokens)).astype(np.int32),
                            seq_lens.astype(np.int32), batch.block_table[rows, :max_blocks], in_flight, source,
                            self.prev_sampled)
        max_query_len = int(num_scheduled.max())
        shape = self.cuda_graphs.shape_for(len(rows), len(positions), max_query_len) if self.cuda_graphs else None
        if shape is not None:
            hidden = self.cuda_graphs.run(inputs, shape)
        else:
            hidden = self.model(*inputs.upload(self.device))
        if self.proposer is not None:
            self.proposer.prepare(inputs, max_query_len)

        # Requests whose computed tokens caught up with their tokens sample a new one; the
        # others were mid-prefill. Each samples after its last token and after each draft.
        sampling = seq_lens >= batch.num_tokens[rows]
        sample_rows = rows[sampling]
        sample_ids = [request_ids[i] for i in np.flatnonzero(sampling)]
        layout = SpecLayout.build(num_draft[sampling]) if num_draft.any() and len(sample_rows) else None
        if layout is None:
            logits_indices = cu_num_tokens[sampling] - 1
            logits_rows, logits_seq_lens = sample_rows, seq_lens[sampling]
        else:
            logits_indices = np.repeat(cu_num_tokens[sampling] - layout.num_logits, layout.num_logits) \
                + layout.index_in_request
            logits_rows = np.repeat(sample_rows, layout.num_logits)
            logits_seq_lens = np.repeat(seq_lens[sampling] - num_draft[sampling], layout.num_logits) \
                + layout.index_in_request

        prompt_logprobs = self._prompt_logprobs(hidden, rows, num_computed, num_scheduled,
                                                cu_num_tokens, request_ids)
        propose = scheduler_output.propose_drafts and self.proposer is not None
        if not len(sample_rows):
            self.pending.append(PendingStep([], sample_rows, None, None, None, [], prompt_logprobs, propose))
            return
        # Logits stay in the model's dtype: the fused sampling kernel reads them as they are.
        # Logits rows are increasing token indices: as many as tokens means every token.
        logits_hidden = hidden[:len(logits_indices)] if len(logits_indices) == len(positions) \
            else hidden[self._to_device(logits_indices)]
        logits = self.model.compute_logits(logits_hidden, float32=False)
        metadata = self._sampling_metadata(logits_rows, logits_seq_lens)
        out = self.sampler(logits, metadata)
        greedy_draft_token_ids = None
        if layout is None:
            sampled = out.sampled_token_ids.unsqueeze(1)
            # Async scheduling (never with drafts) feeds these to the next step on the device.
            self.prev_sampled = out.sampled_token_ids
            self.prev_sampled_index.fill(-1)
            self.prev_sampled_index[sample_rows] = np.arange(len(sample_rows))
        elif metadata.all_greedy and out.logprobs is None:
            sampled = out.sampled_token_ids
            greedy_draft_token_ids = self._draft_token_ids(layout, logits_rows, logits_seq_lens)
        else:
            draft_token_ids = self._draft_token_ids(layout, logits_rows, logits_seq_lens)
            to_device = self._to_device
            sampled = verify_drafts(logits, metadata, out.sampled_token_ids, layout, to_device(draft_token_ids),
                                    self._request_keys(sample_rows, seq_lens[sampling]), to_device)
            if out.logprobs is not None:
                # Logprobs of the tokens emitted at each position, not of the sampler's draws.
                ids, lps, ranks = compute_logprobs_rows(logits.float().log_softmax(dim=-1),
                                                        emitted_per_row(sampled, layout, to_device),
                                                        metadata.max_num_logprobs)
                out = SamplerOutput(out.sampled_token_ids, ids, lps, ranks)

        assert len(self.pending) < len(self.sampled_host), "more steps in flight than sampled-id buffers"
        sampled_host = self.sampled_host[self.num_launched % len(self.sampled_host)][:sampled.numel()]
        sampled_host = sampled_host.view(sampled.shape).copy_(sampled, non_blocking=True)
        self.num_launched += 1
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.pending.append(PendingStep(sample_ids, sample_rows, sampled_host, ready, out,
                                        batch.num_logprobs[sample_rows].tolist(), prompt_logprobs,
                                        propose, layout, greedy_draft_token_ids))

    def _draft_token_ids(self, layout: SpecLayout, logits_rows: np.ndarray, logits_seq_lens: np.ndarray) -> np.ndarray:
        """The draft each draft-verifying logits row checks: the token right after that row's
        position."""
        index = layout.draft_logits_index
        return self.batch.token_ids[logits_rows[index], logits_seq_lens[index]]

    def _place_drafts(self, spec_token_ids: dict[str, list[int]], request_ids: list[str],
                      rows: np.ndarray) -> np.ndarray:
        """Write each request's drafts after its known tokens, where the step's inputs are
        gathered from; return the number of drafts per scheduled request."""
        num_draft = np.zeros(len(rows), dtype=np.int64)
        if not spec_token_ids:
            return num_draft
        batch = self.batch
        for i, request_id in enumerate(request_ids):
            drafts = spec_token_ids.get(request_id)
            if drafts:
                row, start = rows[i], batch.num_tokens[rows[i]]
                batch.token_ids[row, start:start + len(drafts)] = drafts
                num_draft[i] = len(drafts)
        return num_draft

    def collect(self) -> ModelRunnerOutput:
        """The oldest launched step's result, waiting for the device if it is still running."""
        step = self.pending.popleft()
        self._write_back(step)
        sampled = step.tokens.tolist() if step.tokens is not None else []
        if step.spec_layout is not None:
            sampled = [row[:row.index(-1)] if -1 in row else row for row in sampled]
        return ModelRunnerOutput(
            request_ids=step.request_ids,
            sampled_token_ids=sampled,
            logprobs=self._sampled_logprobs(step, sampled),
            prompt_logprobs=step.prompt_logprobs,
            draft_token_ids=self._propose(step) if step.propose_drafts else {},
        )

    def _propose(self, step: PendingStep) -> dict[str, list[int]]:
        """Drafts for the requests that sampled this step and are still in the batch. Rows
        with logits processors never speculate (see SamplingParams.has_logits_processors)."""
        batch = self.batch
        live = self._live(step)
        rows = step.rows[live]
        if not len(rows):
            return {}
        # k drafts yield up to k + 1 tokens, all within max_model_len.
        max_num_draft = np.clip(self.max_model_len - batch.num_tokens[rows] - 1, 0, None)
        max_num_draft[batch.no_spec[rows]] = 0
        drafts, num_draft = self.proposer.propose(batch.token_ids, batch.num_tokens, rows, max_num_draft)
        request_ids = [r for r, keep in zip(step.request_ids, live) if keep]
        return {request_ids[i]: drafts[i, :num_draft[i]].tolist() for i in np.flatnonzero(num_draft)}

    def _live(self, step: PendingStep) -> np.ndarray:
        """Which of the step's sampling requests still hold the row they had at launch."""
        row_of = self.batch.req_id_to_row
        return np.fromiter((row_of.get(r, -1) == row for r, row in zip(step.request_ids, step.rows)),
                           bool, len(step.rows))

    def _write_back(self, step: PendingStep) -> None:
        """Append the step's sampled tokens to the host copy of each request's tokens (once;
        requests dropped or replaced since the launch are skipped)."""
        if step.written or step.sampled_host is None:
            return
        if step.ready is not None:
            step.ready.synchronize()
        step.written = True
        step.tokens = step.sampled_host.numpy()
        if step.greedy_draft_token_ids is not None:
            step.tokens = accept_greedy(step.tokens, step.greedy_draft_token_ids, step.spec_layout)
        batch = self.batch
        live = self._live(step)
        rows = step.rows[live]
        sampled = step.tokens[live]
        if sampled.shape[1] == 1:
            batch.token_ids[rows, batch.num_tokens[rows]] = sampled[:, 0]
            batch.num_tokens[rows] += 1
            return
        valid = sampled >= 0
        positions = batch.num_tokens[rows, None] + np.arange(sampled.shape[1])
        batch.token_ids[np.broadcast_to(rows[:, None], valid.shape)[valid], positions[valid]] = sampled[valid]
        batch.num_tokens[rows] += valid.sum(axis=1)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return upload([array], self.device)[0]

    def _sampling_metadata(self, rows: np.ndarray, seq_lens: np.ndarray) -> SamplingMetadata:
        """seq_lens: each row's tokens up to the one it samples after. Output counts derive
        from it rather than from the host's tokens, which may lag a step in flight."""
        b = self.batch
        num_output = seq_lens - b.num_prompt_tokens[rows]
        temperature = b.temperature[rows]
        greedy = temperature == 0
        top_k = b.top_k[rows]
        uses_top_k = (top_k > 0) & (top_k < self.vocab_size)
        top_p = b.top_p[rows]
        min_p = b.min_p[rows]
        presence, frequency, repetition = (b.presence_penalty[rows], b.frequency_penalty[rows],
                                           b.repetition_penalty[rows])
        penalized = b.penalized[rows]
        output_counts = prompt_mask = None
        if penalized.any():
            # Penalties read the tokens themselves: wait for the ones still in flight.
            for step in self.pending:
                self._write_back(step)
            output_counts, prompt_mask = self._token_counts(rows)

        row_of = {int(r): i for i, r in enumerate(rows)} if b.logit_bias or b.stop_token_ids else {}
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
        all_greedy = bool(greedy.all())
        # An all-greedy batch without logits processors takes the argmax and draws nothing.
        fused = self.device.type == "cuda" and not needs_torch.all() and not all_greedy
        # One draw for every row's key; seeded rows' keys are overwritten below.
        seeds = torch.randint(0, (1 << 63) - 1, (len(rows),), dtype=torch.int64).numpy() if fused else None
        generators: dict[int, torch.Generator] = {}
        # A request verifying drafts has a row per position, each seeded by its own position.
        for i in np.flatnonzero(np.isin(rows, list(b.seeds))) if b.seeds else ():
            row = int(rows[i])
            key = _seed_key(b.seeds[row], int(num_output[i]))
            if fused:
                seeds[i] = key
            if not fused or needs_torch[i]:
                # The sampler draws after all rows are seeded: a request's later rows need
                # generators of their own.
                generator = b.generators[row] if i == 0 or rows[i - 1] != row else torch.Generator(self.device)
                generator.manual_seed(key)
                generators[i] = generator

        # Every array the step's sampling reads, sent in one copy; those no row uses stay None.
        arrays = {
            "temperature": temperature,
            "top_p": top_p if (top_p < 1.0).any() else None,
            "top_k": np.where(uses_top_k, top_k, self.vocab_size) if uses_top_k.any() else None,
            "min_p": min_p if min_p.any() else None,
            "seeds": seeds if fused else None,
            "torch_rows": needs_torch if fused and needs_torch.any() else None,
            "presence_penalty": presence if presence.any() else None,
            "frequency_penalty": frequency if frequency.any() else None,
            "repetition_penalty": repetition if (repetition != 1.0).any() else None,
            "bias_rows": np.array(bias_rows, dtype=np.int64) if bias_rows else None,
            "bias_token_ids": np.array(bias_ids, dtype=np.int64) if bias_rows else None,
            "bias_values": np.array(bias_values, dtype=np.float32) if bias_rows else None,
            "ban_rows": np.array(ban_rows, dtype=np.int64) if ban_rows else None,
            "ban_token_ids": np.array(ban_ids, dtype=np.int64) if ban_rows else None,
        }
        used = [name for name, array in arrays.items() if array is not None]
        on_device = dict(zip(used, upload([arrays[name] for name in used], self.device)))
        return SamplingMetadata(
            all_greedy=all_greedy,
            generators=generators,
            output_token_counts=output_counts,
            prompt_token_mask=prompt_mask,
            max_num_logprobs=int(b.num_logprobs[rows].max()),
            **{name: on_device.get(name) for name in arrays},
        )

    def _token_counts(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: how often each vocab token occurs in the output, and which occur in the prompt."""
        b = self.batch
        width = int(b.num_tokens[rows].max())
        tokens, num_prompt, num_tokens = upload([b.token_ids[rows, :width], b.num_prompt_tokens[rows, None],
                                                 b.num_tokens[rows, None]], self.device)
        pos = torch.arange(width, device=self.device).unsqueeze(0)
        is_output = (pos >= num_prompt) & (pos < num_tokens)
        counts = torch.zeros(len(rows), self.vocab_size, device=self.device)
        counts.scatter_add_(1, tokens, is_output.float())
        prompt_mask = torch.zeros(len(rows), self.vocab_size, device=self.device)
        prompt_mask.scatter_add_(1, tokens, (pos < num_prompt).float())
        return counts, prompt_mask > 0

    def _request_keys(self, rows: np.ndarray, seq_lens: np.ndarray) -> torch.Tensor:
        """A Philox key per request for the rejection sampler: from the seed and the output
        position of its first draft for seeded requests, drawn afresh for the others."""
        keys = torch.randint(0, (1 << 63) - 1, (len(rows),), dtype=torch.int64).numpy()
        num_output = seq_lens - self.batch.num_prompt_tokens[rows]
        for i in np.flatnonzero(np.isin(rows, list(self.batch.seeds))) if self.batch.seeds else ():
            # Offset from the sampler's keys of the same positions, so the two draw apart.
            keys[i] = _seed_key(self.batch.seeds[int(rows[i])] + 1, int(num_output[i]))
        return self._to_device(keys)

    def _sampled_logprobs(self, step: PendingStep, sampled: list[list[int]]) -> dict[str, Logprobs]:
        """Each request's logprobs at each of its new tokens: rows of the sampler's output,
        one per position sampled (several when drafts were verified)."""
        out = step.sampler_output
        if out is None or out.logprobs is None:
            return {}
        ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        starts = step.spec_layout.cu_num_logits if step.spec_layout is not None else range(len(sampled))
        result = {}
        for request_id, k, start, tokens in zip(step.request_ids, step.num_logprobs, starts, sampled):
            if k >= 0:
                end = start + len(tokens)
                result[request_id] = Logprobs(token_ids=[row[:1 + k] for row in ids[start:end]],
                                              logprobs=[row[:1 + k] for row in lps[start:end]],
                                              ranks=ranks[start:end])
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
