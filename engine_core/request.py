"""The engine core's state of one request."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from typing import TYPE_CHECKING

from engine_core.protocol import EngineCoreRequest, FinishReason, Logprobs, SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again, its KV freed; it recomputes from its tokens so far
    FINISHED = 3


class Request:
    """A request's tokens and progress.

    `num_computed_tokens` counts tokens whose KV is in the cache; the scheduler gives the
    request `num_tokens - num_computed_tokens` more (chunked to the step's budget) until it
    catches up, at which point the step samples its next token. Prefill and decode are the
    same thing seen at different distances from catching up.
    """

    def __init__(self, request: EngineCoreRequest, eos_token_ids: frozenset[int]) -> None:
        self.request_id: str = request.request_id
        self.prompt_token_ids: list[int] = request.prompt_token_ids
        self.sampling_params: SamplingParams = request.sampling_params
        self.num_prompt_tokens: int = len(request.prompt_token_ids)
        self.all_token_ids: list[int] = list(request.prompt_token_ids)
        self.num_computed_tokens: int = 0
        # Tokens being sampled by a step still on the GPU: scheduled past, not yet known.
        self.num_output_placeholders: int = 0
        # Draft tokens proposed for the next step (speculative decoding), not yet verified.
        self.spec_token_ids: list[int] = []
        self.num_cached_tokens: int = -1  # prefix-cache hit of the first scheduling; -1: not yet
        self.scheduled_time: float = 0.0  # wall clock of the first scheduling
        self.status: RequestStatus = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.error: str | None = None  # with finish_reason ERROR: the engine's fault (a 500)
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of all_token_ids
        self.prompt_logprobs: list[Logprobs] = []  # chunks gathered until the first output
        self.stop_token_ids: frozenset[int] = request.sampling_params.stop_ids(eos_token_ids)
        # Structured outputs: the request's grammar matcher, being built or built
        # (StructuredOutputManager); None without a grammar. `matcher` is its result, set when
        # the request is admitted: the hot path reads it without the future's lock.
        self.grammar: Future[LLMatcher] | None = None
        self.matcher: LLMatcher | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_reason: int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
