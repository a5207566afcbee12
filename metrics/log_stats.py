"""The periodic log line, as vLLM's: throughput over the last interval and the engine's state."""

from __future__ import annotations

import logging
import time

from metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger("octavo.stats")

DEFAULT_INTERVAL_S = 10.0  # vLLM's default; OCTAVO_LOG_STATS_INTERVAL overrides it


class LoggingStatLogger:
    def __init__(self) -> None:
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._running = self._waiting = 0
        self._kv_cache_usage = 0.0
        self._prefix_hit_rate = 0.0  # of the last interval with lookups
        self._was_busy = False
        self._spec_drafts = self._spec_draft_tokens = self._spec_accepted = 0
        self._spec_accepted_per_pos: list[int] = []

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        self._prompt_tokens += iteration.num_prompt_tokens
        self._generation_tokens += iteration.num_generation_tokens
        if scheduler_stats is not None:
            self._running = scheduler_stats.num_running_reqs
            self._waiting = scheduler_stats.num_waiting_reqs
            self._kv_cache_usage = scheduler_stats.kv_cache_usage
            self._prefix_queries += scheduler_stats.prefix_cache_queries
            self._prefix_hits += scheduler_stats.prefix_cache_hits
            if scheduler_stats.spec_num_drafts:
                self._record_spec(scheduler_stats)

    def _record_spec(self, stats: SchedulerStats) -> None:
        self._spec_drafts += stats.spec_num_drafts
        self._spec_draft_tokens += stats.spec_num_draft_tokens
        self._spec_accepted += stats.spec_num_accepted_tokens
        per_pos = stats.spec_num_accepted_tokens_per_pos
        if len(self._spec_accepted_per_pos) < len(per_pos):
            self._spec_accepted_per_pos += [0] * (len(per_pos) - len(self._spec_accepted_per_pos))
        for pos, accepted in enumerate(per_pos):
            self._spec_accepted_per_pos[pos] += accepted

    def log(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_log, 1e-9)
        if self._prefix_queries:
            self._prefix_hit_rate = self._prefix_hits / self._prefix_queries
        busy = bool(self._prompt_tokens or self._generation_tokens or self._running or self._waiting)
        # An idle server logs once, the interval it went idle, then stays quiet at INFO.
        level = logging.INFO if busy or self._was_busy else logging.DEBUG
        logger.log(level, "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                   "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                   self._prompt_tokens / elapsed, self._generation_tokens / elapsed, self._running,
                   self._waiting, self._kv_cache_usage * 100, self._prefix_hit_rate * 100)
        if self._spec_drafts:
            self._log_spec()
        self._was_busy = busy
        self._last_log = now
        self._prompt_tokens = self._generation_tokens = self._prefix_queries = self._prefix_hits = 0

    def _log_spec(self) -> None:
        """vLLM's speculative-decoding line: the mean acceptance length counts the token every
        verification yields besides the accepted drafts."""
        per_pos = ", ".join(f"{accepted / self._spec_drafts:.3f}" for accepted in self._spec_accepted_per_pos)
        logger.info("SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, Drafted: %d tokens, "
                    "Avg Draft acceptance rate: %.1f%%, Per-position acceptance rate: %s",
                    1 + self._spec_accepted / self._spec_drafts, self._spec_accepted, self._spec_draft_tokens,
                    100 * self._spec_accepted / self._spec_draft_tokens, per_pos)
        self._spec_drafts = self._spec_draft_tokens = self._spec_accepted = 0
        self._spec_accepted_per_pos = []
