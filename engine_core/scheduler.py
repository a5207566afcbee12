"""The scheduler: one token-budget loop, no prefill or decode phases.

Each step gives every request tokens so that its `num_computed_tokens` catches up with its
`num_tokens`, running requests first and then waiting ones, within `max_num_batched_tokens`
and `max_num_seqs`. A long prompt is simply truncated to the budget left (chunked prefill).
When the KV pool runs dry, the newest running request is preempted by recompute.

Steps are pipelined: the next step is scheduled while the GPU still samples this one's tokens.
A request whose token is in flight counts it as a placeholder (`num_output_placeholders`),
so it is scheduled its next decode before the token is known; the model runner feeds the
token to it on the GPU. A stop found when the token arrives wastes that one extra decode.

Speculative decoding (steps are not pipelined then): a request's draft tokens, proposed by the
workers after the step that sampled its last token, are scheduled as extra query tokens right
after it. The step verifies them and returns the accepted ones plus one more token; the KV
written for the rejected ones is stale, so `num_computed_tokens` rolls back over them and the
next step overwrites it.

Structured outputs: a request with a grammar waits (without holding up the others) until its
matcher is built; a step names the requests that sample under a grammar, the engine has
their masks filled (`start_grammar_bitmask`) once the step before is collected, and the
tokens kept advance the matchers (structured_output.py).

A step the workers fail to run must end only the request to blame (`recover_from_failed_step`):
every running request is preempted by recompute; a request that failed alone finishes with an
error; those of a failed batch become suspects, and each then runs alone until it samples
(cleared) or fails (the culprit).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import numpy as np

from engine_core.block_pool import KVCacheBlock
from engine_core.config import SpeculativeConfig
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.protocol import (
    EngineCoreOutput,
    FinishReason,
    Logprobs,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    now,
)
from engine_core.request import Request, RequestStatus
from engine_core.structured_output import GrammarViolation, StructuredOutputManager
from metrics.stats import SchedulerStats


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int,
                 speculative_config: SpeculativeConfig | None = None,
                 structured_output: StructuredOutputManager | None = None) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.speculative_config = speculative_config
        self.num_lookahead_tokens = speculative_config.num_lookahead_tokens if speculative_config else 0
        num_spec_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        self.spec_stats = SpecDecodingStats(num_spec_tokens)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the workers must drop at the next step (finished, aborted, preempted).
        self.finished_request_ids: list[str] = []
        self.num_preemptions = 0  # since the last stats
        # Requests of a failed step not yet run alone: while any is left, each step runs one.
        self.suspects: set[str] = set()
        self.structured_output = structured_output
        # Requests whose grammar failed to build: reported with the next step's outputs.
        self.grammar_failures: list[EngineCoreOutput] = []

    # ---- requests in and out ----

    def add_request(self, request: Request) -> None:
        if request.sampling_params.structured_outputs is not None:
            self.structured_output.add_request(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish(FinishReason.ABORT)
            self._free(request)
            self.suspects.discard(request_id)
            aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.finished_request_ids.append(request.request_id)
        del self.requests[request.request_id]

    # ---- the step ----

    def _speculate(self) -> bool:
        """Whether this step verifies drafts and the workers propose new ones after it."""
        spec = self.speculative_config
        return spec is not None and (spec.disable_by_batch_size is None
                                     or len(self.running) <= spec.disable_by_batch_size)

    def _num_lookahead(self, num_computed: int, num_new: int) -> int:
        if not self.num_lookahead_tokens:
            return 0
        return max(0, min(self.num_lookahead_tokens, self.max_model_len - num_computed - num_new))

    def schedule(self) -> SchedulerOutput:
        if self.suspects:
            return self._schedule_suspect()
        return self._schedule()

    def _schedule_suspect(self) -> SchedulerOutput:
        """A step of one suspect alone: the one running, or else the first waiting. The normal
        step runs over a view that holds only it; requests cleared meanwhile keep their KV and
        sit the step out, and waiting ones stay waiting."""
        suspect = (next((r for r in self.running if r.request_id in self.suspects), None)
                   or next((r for r in self.waiting if r.request_id in self.suspects), None))
        if suspect is None:  # the rest finished or were aborted meanwhile
            self.suspects.clear()
            return self._schedule()
        is_running = suspect.status == RequestStatus.RUNNING
        others = [r for r in self.running if r is not suspect]
        if not is_running:
            # Its whole sequence must fit beside the cleared requests, though the failed batch
            # may have held only a chunk of it, or prefixes the dropped cache no longer shares:
            # if not, the newest give their KV back.
            kv = self.kv_cache_manager
            num_blocks = -(-(suspect.num_tokens + self.num_lookahead_tokens) // kv.block_size)
            while others and kv.num_free_blocks < num_blocks:
                self._preempt(others.pop())
            self.waiting.remove(suspect)
        waiting = self.waiting
        self.running = [suspect] if is_running else []
        self.waiting = deque() if is_running else deque([suspect])
        try:
            return self._schedule()
        finally:
            self.running = others + self.running
            self.waiting.extend(waiting)

    def _schedule(self) -> SchedulerOutput:
        """Running requests first, then waiting ones, all drawing on one token budget. The
        output is filled as requests are scheduled; the budget is what it does not hold yet."""
        speculate = self._speculate()
        # Requests preempted below join those finished since the last step.
        output = SchedulerOutput(num_scheduled_tokens={}, total_num_scheduled_tokens=0,
                                 finished_request_ids=self.finished_request_ids,
                                 propose_drafts=speculate)
        num_preemptions = self.num_preemptions
        self._schedule_running(output, speculate)
        # Waiting requests only join a step that preempted nobody: otherwise the pool is
        # already too small for those running.
        if self.num_preemptions == num_preemptions:
            self._schedule_waiting(output)
        self.finished_request_ids = []
        self._advance(output)
        return output

    def _token_budget(self, output: SchedulerOutput) -> int:
        return self.max_num_batched_tokens - output.total_num_scheduled_tokens

    def _schedule_running(self, output: SchedulerOutput, speculate: bool) -> None:
        """Give each running request, oldest first, the tokens it lacks (its drafts included).
        This loop runs for every request at every step: it keeps to locals and few calls."""
        budget = self._token_budget(output)
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            i += 1  # preemption pops from the end, never before i
            if request.spec_token_ids and not speculate:
                request.spec_token_ids = []
            num_known = len(request.all_token_ids) + request.num_output_placeholders - request.num_computed_tokens
            num_new = min(num_known + len(request.spec_token_ids), budget)
            if num_new <= 0 or self._reached_length(request):
                continue  # its last token is in flight; it finishes when that arrives
            new_blocks = self._allocate_or_preempt(request, num_new)
            if new_blocks is None:
                return  # it preempted itself, the last one running
            self._add_running(output, request, num_new, num_known, new_blocks)
            budget -= num_new

    def _allocate_or_preempt(self, request: Request, num_new: int) -> list[KVCacheBlock] | None:
        """KV slots for `num_new` more tokens of a running request, preempting the newest
        running requests until they fit. None: the request was the newest, preempted too."""
        num_lookahead = self._num_lookahead(request.num_computed_tokens, num_new)
        while (new_blocks := self.kv_cache_manager.allocate_slots(request, num_new, None, num_lookahead)) is None:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return None
        return new_blocks

    def _add_running(self, output: SchedulerOutput, request: Request, num_new: int, num_known: int,
                     new_blocks: list[KVCacheBlock]) -> None:
        self._add(output, request, num_new)
        if request.spec_token_ids:
            # The budget may cut the drafts short; those left out are dropped.
            del request.spec_token_ids[max(num_new - num_known, 0):]
            if request.spec_token_ids:
                output.scheduled_spec_token_ids[request.request_id] = request.spec_token_ids
        cached = output.cached_requests
        cached.request_ids.append(request.request_id)
        cached.new_block_ids.append([b.block_id for b in new_blocks] if new_blocks else [])
        cached.num_computed_tokens.append(request.num_computed_tokens)

    def _schedule_waiting(self, output: SchedulerOutput) -> None:
        """Admit waiting requests in order, each from its longest cached prefix, while the
        token budget, max_num_seqs and the KV pool allow."""
        # Requests whose grammar is still being built sit this step out, keeping their place.
        not_ready: list[Request] = []
        try:
            self._admit_waiting(output, not_ready)
        finally:
            self.waiting.extendleft(reversed(not_ready))

    def _admit_waiting(self, output: SchedulerOutput, not_ready: list[Request]) -> None:
        kv = self.kv_cache_manager
        while (self.waiting and (budget := self._token_budget(output)) > 0
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            if request.num_output_placeholders:
                return  # preempted with a token in flight: it resumes once the token is known
            if request.grammar is not None:
                if not request.grammar.done():
                    not_ready.append(self.waiting.popleft())
                    continue
                if request.grammar.exception() is not None:
                    self._fail_grammar(self.waiting.popleft())
                    continue
                request.matcher = request.grammar.result()
            hits, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if kv.allocate_slots(request, num_new, hits, self._num_lookahead(num_hit_tokens, num_new)) is None:
                return
            self.waiting.popleft()
            self._start_running(request, num_hit_tokens)
            self._add(output, request, num_new)
            output.new_requests.append(NewRequestData(
                request_id=request.request_id,
                token_ids=request.all_token_ids,
                num_prompt_tokens=request.num_prompt_tokens,
                sampling_params=request.sampling_params,
                block_ids=kv.get_block_ids(request.request_id),
                num_computed_tokens=num_hit_tokens,
            ))

    def _fail_grammar(self, request: Request) -> None:
        """Finish a waiting request whose grammar failed to build with that error."""
        request.finish(FinishReason.ERROR)
        del self.requests[request.request_id]  # it holds no KV blocks, and the workers never saw it
        self.grammar_failures.append(EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[], finish_reason=FinishReason.ERROR,
            error=f"the request's grammar cannot be built: {request.grammar.exception()}"))

    def _start_running(self, request: Request, num_hit_tokens: int) -> None:
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:  # first scheduling, not a resume after preemption
            request.num_cached_tokens = num_hit_tokens
            request.scheduled_time = now()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @staticmethod
    def _add(output: SchedulerOutput, request: Request, num_tokens: int) -> None:
        output.num_scheduled_tokens[request.request_id] = num_tokens
        output.total_num_scheduled_tokens += num_tokens

    def _advance(self, output: SchedulerOutput) -> None:
        """The tokens are as good as computed: the next step schedules from there. A request
        that catches up (drafts included) samples this step, under its grammar if it has one."""
        grammar_requests: list[Request] = []
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens == (request.num_tokens + request.num_output_placeholders
                                               + len(request.spec_token_ids)):
                request.num_output_placeholders += 1
                if request.grammar is not None:
                    grammar_requests.append(request)
        if grammar_requests:
            output.grammar_request_ids = [r.request_id for r in grammar_requests]

    def start_grammar_bitmask(self, step: SchedulerOutput) -> Future[np.ndarray]:
        """Start filling the masks of the positions `step` samples under grammars, on the mask
        thread; every step before it must have been collected, so that each matcher has taken
        the tokens before them. A request finished meanwhile gets masks allowing everything:
        its tokens are dropped. Nothing may change the scheduler until the future is done."""
        return self.structured_output.start_bitmask(
            [(self.requests.get(request_id), step.scheduled_spec_token_ids.get(request_id, []))
             for request_id in step.grammar_request_ids])

    def _reached_length(self, request: Request) -> bool:
        """Whether the tokens in flight already take the request to max_tokens or max_model_len."""
        if not request.num_output_placeholders:
            return False
        max_tokens = request.sampling_params.max_tokens
        num_tokens = len(request.all_token_ids) + request.num_output_placeholders
        return ((max_tokens is not None and num_tokens - request.num_prompt_tokens >= max_tokens)
                or num_tokens >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.prompt_logprobs = []  # recomputed with the prompt
        self.waiting.appendleft(request)
        # The workers forget it and get it back whole, as a new request, when it resumes.
        self.finished_request_ids.append(request.request_id)
        self.num_preemptions += 1

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens, finish requests that hit a stop condition, and return each
        request's delta."""
        if self.suspects:
            # A suspect that sampled has run a whole step alone: it is cleared.
            self.suspects.difference_update(runner_output.request_ids)
        self._gather_prompt_logprobs(runner_output.prompt_logprobs)
        outputs: list[EngineCoreOutput] = []
        requests, spec_token_ids = self.requests, scheduler_output.scheduled_spec_token_ids
        draft_token_ids, logprobs = runner_output.draft_token_ids, runner_output.logprobs
        for request_id, token_ids in zip(runner_output.request_ids, runner_output.sampled_token_ids):
            request = requests.get(request_id)
            if request is None:
                continue  # finished or aborted while the step ran
            num_drafts = len(spec_token_ids[request_id]) if request_id in spec_token_ids else 0
            new_token_ids = self._accept_tokens(request, token_ids, num_drafts, draft_token_ids.get(request_id))
            outputs.append(self._make_output(request, new_token_ids, logprobs.get(request_id)))
            if request.prompt_logprobs:
                request.prompt_logprobs = []  # sent
            if request.status == RequestStatus.FINISHED:
                self._remove_finished(request)
        return outputs

    def _gather_prompt_logprobs(self, prompt_logprobs: dict[str, Logprobs]) -> None:
        """Keep each request's chunks of prompt logprobs until its first output sends them."""
        for request_id, chunk in prompt_logprobs.items():
            request = self.requests.get(request_id)
            # A request preempted after its first output recomputes them: they were sent then.
            if request is not None and not request.num_output_tokens:
                request.prompt_logprobs.append(chunk)

    def _accept_tokens(self, request: Request, token_ids: list[int], num_drafts: int,
                       draft_token_ids: list[int] | None) -> list[int]:
        """Take a step's sampled tokens (its accepted drafts and one more) and the drafts
        proposed for the next step; return the tokens kept before a stop condition."""
        request.num_output_placeholders -= 1
        if num_drafts:
            num_accepted = len(token_ids) - 1
            request.num_computed_tokens -= num_drafts - num_accepted  # the rejected drafts' KV is stale
            request.spec_token_ids = []
            self.spec_stats.observe(num_drafts, num_accepted)
        new_token_ids = self._append_and_check_stop(request, token_ids)
        if request.grammar is not None:
            self._advance_grammar(request, new_token_ids)
        if draft_token_ids is not None and not request.is_finished:
            request.spec_token_ids = self._trim_drafts(request, draft_token_ids)
            if request.grammar is not None:
                request.spec_token_ids = self.structured_output.trim_drafts(request, request.spec_token_ids)
        return new_token_ids

    def _advance_grammar(self, request: Request, token_ids: list[int]) -> None:
        try:
            past_end = self.structured_output.accept_tokens(request, token_ids)
        except GrammarViolation as e:
            request.finish(FinishReason.ERROR)
            request.error = str(e)
            return
        if past_end and not request.is_finished:
            request.finish(FinishReason.STOP)  # it ignores EOS, the only token the grammar left

    @staticmethod
    def _make_output(request: Request, new_token_ids: list[int], new_logprobs: Logprobs | None) -> EngineCoreOutput:
        is_first = request.num_output_tokens == len(new_token_ids)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            new_logprobs=new_logprobs,
            prompt_logprobs=_merge_logprobs(request.prompt_logprobs) if request.prompt_logprobs else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
            scheduled_time=request.scheduled_time if is_first else 0.0,
            error=request.error,
            error_is_internal=request.error is not None,
        )

    def _remove_finished(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        else:  # preempted while its last token was in flight
            self.waiting.remove(request)
        self._free(request)

    def recover_from_failed_step(self, failed: SchedulerOutput, error: str) -> list[EngineCoreOutput]:
        """Recover from a step the workers failed to run, once they have dropped every request
        and every step in flight. The tokens of those steps are lost, so every running request
        is preempted by recompute. If the failed step ran one request, it finishes with `error`
        (its output is returned); a failed batch's requests become suspects instead."""
        for request in self.requests.values():
            request.num_output_placeholders = 0  # their steps were dropped unsampled
        for request in reversed(self.running):
            self._preempt(request)  # appended left: the waiting queue keeps their order
        self.running = []
        # A block enters the prefix cache when it is allocated, before the step that writes it
        # runs: those of the dropped steps may hold garbage. No request holds a block now, so
        # the whole cache goes rather than telling them apart.
        self.kv_cache_manager.reset_prefix_cache()
        request_ids = list(failed.num_scheduled_tokens)
        if len(request_ids) != 1:
            self.suspects.update(r for r in request_ids if r in self.requests)
            return []
        culprit = self.requests.get(request_ids[0])
        if culprit is None:  # finished or aborted while the step ran
            return []
        self.suspects.discard(culprit.request_id)
        self.waiting.remove(culprit)
        culprit.finish(FinishReason.ERROR)
        self._free(culprit)
        return [EngineCoreOutput(request_id=culprit.request_id, new_token_ids=[],
                                 finish_reason=FinishReason.ERROR, error=error, error_is_internal=True,
                                 num_cached_tokens=max(culprit.num_cached_tokens, 0))]

    def _trim_drafts(self, request: Request, draft_token_ids: list[int]) -> list[int]:
        """Drafts that could all be accepted within max_tokens and max_model_len: verifying k
        drafts yields up to k + 1 tokens."""
        max_tokens = request.sampling_params.max_tokens
        room = self.max_model_len - request.num_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens)
        return draft_token_ids[:max(room - 1, 0)]

    def _append_and_check_stop(self, request: Request, token_ids: list[int]) -> list[int]:
        params = request.sampling_params
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        all_token_ids = request.all_token_ids
        for n, token_id in enumerate(token_ids, start=1):
            all_token_ids.append(token_id)
            num_tokens = len(all_token_ids)
            num_output = num_tokens - request.num_prompt_tokens
            # The sampler masks stop tokens until min_tokens are out, so one here is final.
            if token_id in request.stop_token_ids and num_output > params.min_tokens:
                stop_reason = token_id if token_id in params.stop_token_ids else None
                request.finish(FinishReason.STOP, stop_reason)
                return token_ids[:n]
            if num_output >= max_tokens or num_tokens >= self.max_model_len:
                request.finish(FinishReason.LENGTH)
                return token_ids[:n]
        return token_ids

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=kv.usage(),
            num_free_blocks=kv.num_free_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )
        kv.prefix_cache_queries = kv.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.spec_stats.drain_into(stats)
        if self.structured_output is not None:
            self.structured_output.drain_stats_into(stats)
        return stats


def _merge_logprobs(chunks: list[Logprobs]) -> Logprobs:
    if len(chunks) == 1:
        return chunks[0]
    return Logprobs(
        token_ids=[row for c in chunks for row in c.token_ids],
        logprobs=[row for c in chunks for row in c.logprobs],
        ranks=[r for c in chunks for r in c.ranks],
    )


class SpecDecodingStats:
    """Speculative decoding's counters since the last stats."""

    def __init__(self, num_spec_tokens: int) -> None:
        self.num_spec_tokens = num_spec_tokens
        self._reset()

    def _reset(self) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.num_accepted_tokens_per_pos[pos] += 1

    def drain_into(self, stats: SchedulerStats) -> None:
        if not self.num_drafts:
            return
        stats.spec_num_drafts = self.num_drafts
        stats.spec_num_draft_tokens = self.num_draft_tokens
        stats.spec_num_accepted_tokens = self.num_accepted_tokens
        stats.spec_num_accepted_tokens_per_pos = self.num_accepted_tokens_per_pos
        self._reset()
