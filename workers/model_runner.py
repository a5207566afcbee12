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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine_core.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from kernels import ops
from workers.attention import bind_kv_caches
from workers.cuda_graphs import CudaGraphRunner
from workers.input_batch import InputBatch
from workers.sampler import Sampler, SamplerOutput, SamplingMetadata, compute_logprobs_rows
from workers.sampling_metadata import SamplingMetadataBuilder
from workers.spec_decode import DraftProposer, SpecLayout, accept_greedy, emitted_per_row, verify_drafts
from workers.step_inputs import StepInputs, block_table_width
from workers.upload import upload

_SAMPLED_HOST_BUFFERS = 4


@dataclass
class _ScheduledBatch:
    """The step's scheduled requests, in batch order, and where their tokens are."""

    request_ids: list[str]
    rows: np.ndarray  # [R] their rows in the batch
    num_scheduled: np.ndarray  # [R] query tokens, drafts included
    num_draft: np.ndarray  # [R]
    num_computed: np.ndarray  # [R] tokens already in the KV cache
    cu_num_tokens: np.ndarray  # [R] where each request's query tokens end among the step's
    seq_lens: np.ndarray  # [R] num_computed + num_scheduled
    inputs: StepInputs


@dataclass
class _LogitsRows:
    """The requests that sample this step, and the step's tokens whose logits they sample
    from: a request's last token, and with drafts each draft too (see SpecLayout)."""

    request_ids: list[str]
    rows: np.ndarray  # [B] their rows in the batch
    seq_lens: np.ndarray  # [B]
    layout: SpecLayout | None  # with drafts to verify
    logits_indices: np.ndarray  # [N] the step's token each logits row is computed at
    logits_rows: np.ndarray  # [N] that token's batch row
    logits_seq_lens: np.ndarray  # [N] its request's tokens up to and including it


@dataclass
class PendingStep:
    """A launched step: what `collect` needs once the device is done. Left at its defaults, a
    step in which no request samples."""

    request_ids: list[str] = field(default_factory=list)  # requests that sample, in batch order
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # their rows at launch
    # Pinned host copy of the sampled ids, filled asynchronously: [requests, 1 + max drafts],
    # each row the request's new tokens padded with -1 (or, with greedy_draft_token_ids, the
    # argmax at every logits row).
    sampled_host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded after that copy; None on the CPU
    sampler_output: SamplerOutput | None = None
    num_logprobs: list[int] = field(default_factory=list)  # per sampling request, -1 for none
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)
    propose_drafts: bool = False
    spec_layout: SpecLayout | None = None  # with drafts verified this step
    # Drafts of an all-greedy step, verified on the host once sampled_host (then the argmax at
    # every logits row) is there.
    greedy_draft_token_ids: np.ndarray | None = None
    tokens: np.ndarray | None = None  # the new tokens, [requests, 1 + max drafts], once known
    written: bool = False  # sampled ids appended to the batch's host token ids


@dataclass
class _AwaitingGrammar:
    """A step launched up to its logits, whose sampling waits for its grammar masks."""

    logits: torch.Tensor
    sampling: _LogitsRows
    metadata: SamplingMetadata  # built at launch, while the engine fills the masks
    grammar_request_ids: list[str]
    prompt_logprobs: dict[str, Logprobs]
    propose_drafts: bool


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
        self.device = device
        max_blocks_per_req = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_reqs, max_model_len, max_blocks_per_req, eos_token_ids, device)
        self.sampling_metadata = SamplingMetadataBuilder(self.batch, vocab_size, device)
        self.sampler = Sampler()
        self.max_model_len = max_model_len
        self.num_speculative_tokens = num_speculative_tokens
        self.proposer = make_proposer(self.batch) if make_proposer is not None else None
        self.pending: deque[PendingStep] = deque()
        self.awaiting_grammar: _AwaitingGrammar | None = None  # launched, not yet sampled
        # Pinned buffers the sampled ids come back in, used in turn: a step's buffer is reused
        # only after that step is collected (the engine keeps at most two in flight).
        self.sampled_host = [torch.empty(max_num_reqs * (1 + num_speculative_tokens), dtype=torch.long,
                                         pin_memory=device.type == "cuda") for _ in range(_SAMPLED_HOST_BUFFERS)]
        # An event per buffer, recorded after its copy, on the stream every step runs on (named
        # once: looking up the current stream costs the host tens of microseconds a step).
        self.sampled_ready = ([torch.cuda.Event() for _ in range(_SAMPLED_HOST_BUFFERS)]
                              if device.type == "cuda" else [])
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        # Pinned staging of grammar masks, allocated with the first grammar step (_grammar_bitmask).
        self.grammar_host: torch.Tensor | None = None
        self.grammar_copied = torch.cuda.Event() if device.type == "cuda" else None
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
        max_width = self.batch.block_table.shape[1]
        shapes = [(num_reqs, tokens_per_req, block_table_width(1, max_width))
                  for num_reqs, tokens_per_req in ((1, 17), (2, 8), (3, 5), (16, 16), (16, 1), (3, 1))]
        # Decode-shaped steps split the KV range of their longest request in up to 16 (the
        # attention kernel's NUM_SPLITS, a compile-time constant, grows with the block table's
        # width): one step per width from 16 blocks to 512 compiles every split count. Without
        # this, an eager mixed step of long requests compiled one mid-run: a 0.95 s stall
        # (H200, the Qwen2.5-1.5B shape).
        shapes += [(1, 1, block_table_width(16 << i, max_width)) for i in range(6)]
        for num_reqs, tokens_per_req, width in shapes:
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
            ops.sample_gumbel(logits, temperature, keys)
        if self.proposer is not None:
            # The rejection kernels specialize on the step's most drafts per request: verify
            # one request's 1, 2, ..., k drafts, so that no step compiles a variant mid-run.
            vocab_size = logits.shape[1]
            token_ids = torch.zeros(self.num_speculative_tokens, dtype=torch.long, device=self.device)
            probs = torch.full((self.num_speculative_tokens, vocab_size), 1.0 / vocab_size, device=self.device)
            sampled_row = torch.zeros(1, dtype=torch.bool, device=self.device)
            for num_draft in range(1, self.num_speculative_tokens + 1):
                cu_num_draft = torch.tensor([0, num_draft], dtype=torch.int32, device=self.device)
                ops.rejection_sample(token_ids[:num_draft], cu_num_draft, probs[:num_draft], None, token_ids[:1],
                                     sampled_row, token_ids[:1], num_draft)
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
        self.awaiting_grammar = None
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
        get that step's sampled token on the device, never through the host. A step that
        samples under grammars stops at its logits: `sample_under_grammar` finishes it."""
        self.update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            self.pending.append(PendingStep())
            return
        scheduled = self._prepare_inputs(scheduler_output)
        hidden = self._forward(scheduled.inputs, int(scheduled.num_scheduled.max()))
        prompt_logprobs = self._prompt_logprobs(hidden, scheduled)
        propose = scheduler_output.propose_drafts and self.proposer is not None
        sampling = self._logits_rows(scheduled)
        if sampling is None:
            self.pending.append(PendingStep(prompt_logprobs=prompt_logprobs, propose_drafts=propose))
            return
        logits = self._compute_logits(hidden, sampling.logits_indices, scheduled.inputs.num_tokens)
        metadata = self._sampling_metadata(sampling)
        if scheduler_output.grammar_request_ids:
            # The engine fills their masks meanwhile, and sends them.
            self.awaiting_grammar = _AwaitingGrammar(logits, sampling, metadata,
                                                     scheduler_output.grammar_request_ids, prompt_logprobs, propose)
            return
        self._sample_and_enqueue(logits, sampling, metadata, prompt_logprobs, propose)

    @torch.inference_mode()
    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None:
        """Finish the launched step that waits for its grammar masks (packed as
        `engine_core.structured_output.StructuredOutputManager.bitmask` makes them)."""
        step, self.awaiting_grammar = self.awaiting_grammar, None
        assert step is not None, "no launched step waits for grammar masks"
        step.metadata.grammar_bitmask, step.metadata.grammar_rows = \
            self._grammar_bitmask(step.grammar_request_ids, grammar_bitmask, step.sampling)
        self._sample_and_enqueue(step.logits, step.sampling, step.metadata, step.prompt_logprobs,
                                 step.propose_drafts)

    def _sample_and_enqueue(self, logits: torch.Tensor, sampling: _LogitsRows, metadata: SamplingMetadata,
                            prompt_logprobs: dict[str, Logprobs], propose: bool) -> None:
        sampled, out, greedy_draft_token_ids = self._sample(logits, sampling, metadata)
        sampled_host, ready = self._copy_to_host(sampled)
        self.pending.append(PendingStep(
            request_ids=sampling.request_ids, rows=sampling.rows, sampled_host=sampled_host, ready=ready,
            sampler_output=out, num_logprobs=self.batch.num_logprobs[sampling.rows].tolist(),
            prompt_logprobs=prompt_logprobs, propose_drafts=propose, spec_layout=sampling.layout,
            greedy_draft_token_ids=greedy_draft_token_ids))

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> _ScheduledBatch:
        """Gather the step's inputs from the batch with vectorized numpy."""
        batch = self.batch
        request_ids = list(scheduler_output.num_scheduled_tokens)
        rows = np.fromiter((batch.req_id_to_row[r] for r in request_ids), np.int64, len(request_ids))
        num_scheduled = np.fromiter(scheduler_output.num_scheduled_tokens.values(), np.int64, len(rows))
        num_draft = self._place_drafts(scheduler_output.scheduled_spec_token_ids, request_ids, rows)
        # Token t of the step belongs to request req_index[t] at position positions[t].
        cu_num_tokens = np.cumsum(num_scheduled)
        num_computed = batch.num_computed_tokens[rows]
        seq_lens = num_computed + num_scheduled
        req_index = np.repeat(rows, num_scheduled)
        positions = np.arange(cu_num_tokens[-1]) + np.repeat(num_computed - (cu_num_tokens - num_scheduled),
                                                             num_scheduled)
        block_ids = batch.block_table[req_index, positions // self.block_size].astype(np.int64)
        # Positions past the host's known tokens (and drafts) hold tokens the previous step is
        # sampling.
        in_flight = np.flatnonzero(positions >= batch.num_tokens[req_index] + np.repeat(num_draft, num_scheduled))
        width = block_table_width(int(batch.num_blocks[rows].max()), batch.block_table.shape[1])
        inputs = StepInputs(
            input_ids=batch.token_ids[req_index, positions],
            positions=positions,
            slot_mapping=block_ids * self.block_size + positions % self.block_size,
            query_start_loc=np.concatenate(([0], cu_num_tokens)).astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=batch.block_table[rows, :width],
            in_flight=in_flight,
            in_flight_source=self.prev_sampled_index[req_index[in_flight]],
            prev_sampled=self.prev_sampled,
        )
        return _ScheduledBatch(request_ids=request_ids, rows=rows, num_scheduled=num_scheduled, num_draft=num_draft,
                               num_computed=num_computed, cu_num_tokens=cu_num_tokens, seq_lens=seq_lens,
                               inputs=inputs)

    def _forward(self, inputs: StepInputs, max_query_len: int) -> torch.Tensor:
        """The hidden states of every token of the step, by a captured graph if one fits."""
        graphs = self.cuda_graphs
        shape = graphs.shape_for(inputs.num_reqs, inputs.num_tokens, max_query_len) if graphs else None
        hidden = graphs.run(inputs, shape) if shape is not None else self.model(*inputs.upload(self.device))
        if self.proposer is not None:
            self.proposer.prepare(inputs, max_query_len)
        return hidden

    def _logits_rows(self, scheduled: _ScheduledBatch) -> _LogitsRows | None:
        """The requests that sample and where their logits come from; None when none does.
        Requests whose computed tokens caught up with their tokens sample a new one; the others
        were mid-prefill. Each samples after its last token and after each draft."""
        s = scheduled
        sampling = s.seq_lens >= self.batch.num_tokens[s.rows]
        if not sampling.any():
            return None
        request_ids = [s.request_ids[i] for i in np.flatnonzero(sampling)]
        rows, seq_lens, ends = s.rows[sampling], s.seq_lens[sampling], s.cu_num_tokens[sampling]
        if not s.num_draft.any():
            return _LogitsRows(request_ids=request_ids, rows=rows, seq_lens=seq_lens, layout=None,
                               logits_indices=ends - 1, logits_rows=rows, logits_seq_lens=seq_lens)
        num_draft = s.num_draft[sampling]
        layout = SpecLayout.build(num_draft)
        # A request's logits rows are its last tokens: the one before its drafts, then each draft.
        return _LogitsRows(
            request_ids=request_ids, rows=rows, seq_lens=seq_lens, layout=layout,
            logits_indices=np.repeat(ends - layout.num_logits, layout.num_logits) + layout.index_in_request,
            logits_rows=np.repeat(rows, layout.num_logits),
            logits_seq_lens=np.repeat(seq_lens - num_draft, layout.num_logits) + layout.index_in_request)

    def _compute_logits(self, hidden: torch.Tensor, logits_indices: np.ndarray, num_tokens: int) -> torch.Tensor:
        # Logits rows are increasing token indices: as many as tokens means every token.
        if len(logits_indices) != num_tokens:
            hidden = hidden[self._to_device(logits_indices)]
        # Logits stay in the model's dtype: the fused sampling kernel reads them as they are.
        return self.model.compute_logits(hidden, float32=False)

    def _sample(self, logits: torch.Tensor, sampling: _LogitsRows, metadata: SamplingMetadata
                ) -> tuple[torch.Tensor, SamplerOutput, np.ndarray | None]:
        """The new tokens on the device, [requests, 1 + max drafts] padded with -1, and the
        sampler's output. An all-greedy step verifying drafts returns the argmax at every
        logits row instead, [N], and the drafts, which the host accepts (accept_greedy)."""
        out = self.sampler(logits, metadata)
        if sampling.layout is None:
            self._feed_next_step(out.sampled_token_ids, sampling.rows)
            return out.sampled_token_ids.unsqueeze(1), out, None
        draft_token_ids = self._draft_token_ids(sampling)
        if metadata.all_greedy and out.logprobs is None:
            return out.sampled_token_ids, out, draft_token_ids
        sampled, out = self._verify_drafts(logits, metadata, out, sampling, draft_token_ids)
        return sampled, out, None

    def _sampling_metadata(self, sampling: _LogitsRows) -> SamplingMetadata:
        penalized = self.batch.penalized[sampling.logits_rows]
        if penalized.any():
            # Penalties count the rows' own tokens: those of the steps in flight must be on the
            # host first.
            for step in self.pending:
                self._write_back(step)
        return self.sampling_metadata.build(sampling.logits_rows, sampling.logits_seq_lens, penalized)

    def _grammar_bitmask(self, grammar_request_ids: list[str], grammar_bitmask: np.ndarray, sampling: _LogitsRows
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's grammar masks on the device, and the logits row each applies to: a
        grammar request's rows are all those it samples (after its last token, then each
        draft), in the order the scheduler packed them."""
        index_of = {request_id: i for i, request_id in enumerate(sampling.request_ids)}
        requests = np.fromiter((index_of[r] for r in grammar_request_ids), np.int64, len(grammar_request_ids))
        layout = sampling.layout
        if layout is None:
            rows = requests
        else:
            num_logits = layout.num_logits[requests]
            first = np.repeat(layout.cu_num_logits[requests], num_logits)
            rows = first + np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
        masks = grammar_bitmask.reshape(len(rows), -1)
        if self.device.type != "cuda":
            return torch.from_numpy(masks), torch.from_numpy(rows)
        # A persistent pinned buffer: a batch's masks are megabytes (vocab / 8 bytes a row),
        # too large to pin afresh every step. Its last copy is done long before (that step was
        # collected), but the event makes sure.
        if self.grammar_host is None or self.grammar_host.numel() < masks.size:
            self.grammar_host = torch.empty(masks.size, dtype=torch.int32, pin_memory=True)
        self.grammar_copied.synchronize()
        host = self.grammar_host[:masks.size]
        host.numpy()[:] = masks.reshape(-1)
        device_masks = host.to(self.device, non_blocking=True).view(masks.shape)
        self.grammar_copied.record(self.stream)
        return device_masks, self._to_device(rows)

    def _feed_next_step(self, sampled: torch.Tensor, rows: np.ndarray) -> None:
        """Keep the sampled ids on the device for the next step's inputs (async scheduling,
        never with drafts)."""
        self.prev_sampled = sampled
        self.prev_sampled_index.fill(-1)
        self.prev_sampled_index[rows] = np.arange(len(rows))

    def _verify_drafts(self, logits: torch.Tensor, metadata: SamplingMetadata, out: SamplerOutput,
                       sampling: _LogitsRows, draft_token_ids: np.ndarray) -> tuple[torch.Tensor, SamplerOutput]:
        to_device = self._to_device
        keys = self.sampling_metadata.request_keys(sampling.rows, sampling.seq_lens)
        sampled = verify_drafts(logits, metadata, out.sampled_token_ids, sampling.layout, to_device(draft_token_ids),
                                keys, to_device)
        if out.logprobs is None:
            return sampled, out
        # Logprobs of the tokens emitted at each position, not of the sampler's draws.
        ids, lps, ranks = compute_logprobs_rows(logits.float().log_softmax(dim=-1),
                                                emitted_per_row(sampled, sampling.layout, to_device),
                                                metadata.max_num_logprobs)
        return sampled, SamplerOutput(out.sampled_token_ids, ids, lps, ranks)

    def _copy_to_host(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Enqueue the copy of the sampled ids to the next pinned buffer, and an event after it."""
        assert len(self.pending) < len(self.sampled_host), "more steps in flight than sampled-id buffers"
        turn = self.num_launched % len(self.sampled_host)
        self.num_launched += 1
        sampled_host = self.sampled_host[turn][:sampled.numel()].view(sampled.shape).copy_(sampled, non_blocking=True)
        if self.device.type != "cuda":
            return sampled_host, None
        ready = self.sampled_ready[turn]
        ready.record(self.stream)
        return sampled_host, ready

    def _draft_token_ids(self, sampling: _LogitsRows) -> np.ndarray:
        """The draft each draft-verifying logits row checks: the token right after that row's
        position."""
        index = sampling.layout.draft_logits_index
        return self.batch.token_ids[sampling.logits_rows[index], sampling.logits_seq_lens[index]]

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

    def _prompt_logprobs(self, hidden: torch.Tensor, scheduled: _ScheduledBatch) -> dict[str, Logprobs]:
        """Logprobs of each prompt token given those before it, for requests that ask."""
        b, s = self.batch, scheduled
        result = {}
        for i in np.flatnonzero(b.num_prompt_logprobs[s.rows] >= 0):
            row = s.rows[i]
            # Position p predicts token p + 1, which must still be a prompt token.
            start = s.num_computed[i]
            end = min(start + s.num_scheduled[i], b.num_prompt_tokens[row] - 1)
            if end <= start:
                continue
            first = s.cu_num_tokens[i] - s.num_scheduled[i]
            logits = self.model.compute_logits(hidden[first:first + end - start])
            targets = self._to_device(b.token_ids[row, start + 1:end + 1])
            ids, lps, ranks = compute_logprobs_rows(logits.log_softmax(-1), targets,
                                                    int(b.num_prompt_logprobs[row]))
            result[s.request_ids[i]] = Logprobs(token_ids=ids.tolist(), logprobs=lps.tolist(),
                                                ranks=ranks.tolist())
        return result
