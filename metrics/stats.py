"""What the frontend learns from each engine step, as plain data for the stat loggers.

As in vLLM, latencies are timed by the frontend as tokens reach it (one wall-clock reading
per engine step): arrival to first token (TTFT), token to token (inter-token latency),
arrival to finish (end to end). The one moment only the engine knows, when a request was
first scheduled, comes with the request's first output and splits its life into queue,
prefill and decode time. This module imports nothing from the project: the engine's
per-step stats struct lives here, and the engine core imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgspec

# Finish reasons of requests that ran to their end; aborted and failed requests are only
# counted, so a client giving up early does not read as a fast request.
COMPLETED_REASONS = frozenset({"stop", "length"})
FINISH_REASONS = ("stop", "length", "abort", "error")


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The engine's stats, sent with each step's outputs (a wire struct of
    engine_core.protocol, encoded as the others are); the counters cover only the step (or
    steps) since the previous stats."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up since the last stats
    prefix_cache_hits: int = 0  # tokens found since the last stats
    num_preemptions: int = 0
    num_batched_tokens: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []  # index i: accepted at draft position i
    # Structured outputs: grammars built (cache misses) and their build time, cache hits.
    grammar_compile_seconds: float = 0.0
    grammar_cache_hits: int = 0
    grammar_cache_misses: int = 0


@dataclass(slots=True)
class RequestStats:
    """One engine request's timeline (wall-clock seconds); 0.0 until the moment comes."""

    arrival_time: float
    num_prompt_tokens: int
    scheduled_time: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    num_generation_tokens: int = 0


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float
    prefill_time: float
    decode_time: float
    inference_time: float

    @property
    def completed(self) -> bool:
        return self.finish_reason in COMPLETED_REASONS


class IterationStats:
    """What one batch of engine outputs (or one abort) did to the requests it touched."""

    def __init__(self, timestamp: float) -> None:
        self.timestamp = timestamp
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.time_to_first_tokens: list[float] = []
        self.inter_token_latencies: list[float] = []
        self.finished_requests: list[FinishedRequestStats] = []

    def update_from_output(self, request: RequestStats, num_new_tokens: int, scheduled_time: float) -> None:
        if scheduled_time:
            request.scheduled_time = scheduled_time
        if not num_new_tokens:
            return  # a request the engine rejected: no tokens, no latencies
        request.num_generation_tokens += num_new_tokens
        self.num_generation_tokens += num_new_tokens
        if not request.first_token_time:
            # The prompt counts once its prefill is done, as in vLLM (cached tokens included).
            self.num_prompt_tokens += request.num_prompt_tokens
            self.time_to_first_tokens.append(self.timestamp - request.arrival_time)
            request.first_token_time = self.timestamp
        else:
            self.inter_token_latencies.append(self.timestamp - request.last_token_time)
        request.last_token_time = self.timestamp

    def finish(self, request: RequestStats, finish_reason: str) -> None:
        # Clamped at arrival: the engine's clock is read in another process.
        scheduled = max(request.scheduled_time, request.arrival_time)
        first = request.first_token_time or self.timestamp
        last = request.last_token_time or self.timestamp
        self.finished_requests.append(FinishedRequestStats(
            finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generation_tokens=request.num_generation_tokens,
            e2e_latency=self.timestamp - request.arrival_time,
            queue_time=scheduled - request.arrival_time,
            prefill_time=max(first - scheduled, 0.0),
            decode_time=last - first,
            inference_time=max(last - scheduled, 0.0),
        ))


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None: ...
