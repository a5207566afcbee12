"""Structured outputs in the engine core: each request's grammar matcher, the token bitmask
of every position a step samples, and the matcher's advance by the tokens kept.

The matchers live here, beside the scheduler, as in vLLM V1. The scheduler names the
requests a step samples under grammars; once the step before is collected (so each matcher
has taken the tokens before this step's), the engine starts filling this step's masks on the
mask thread and launches the step meanwhile: the worker runs the forward and stops at its
logits, gets the masks, applies them on the device and samples (engine.py,
`_launch_under_grammar`). A matcher advances only by tokens the request keeps; draft positions
are masked by advancing it through the drafts and rolling it back.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

from engine_core.grammar import GrammarCompiler, check_tokenizer_file, load_tokenizer
from engine_core.request import Request
from metrics.stats import SchedulerStats


class GrammarViolation(RuntimeError):
    """A sampled token the request's grammar refuses. The mask allows only tokens the grammar
    takes, so this is a bug of ours, not the client's: the scheduler ends that request alone."""


class StructuredOutputManager:
    """The grammar side of the scheduler. The compile and mask threads start with the first
    grammar request, and the tokenizer loads then, so engines that never see one pay nothing."""

    def __init__(self, model_path: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_words = -(-vocab_size // 32)
        self._compiler: GrammarCompiler | None = None
        self._executor = llguidance.LLExecutor()  # llguidance's own pool, filling rows in parallel
        self._mask_thread: ThreadPoolExecutor | None = None

    def _get_compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(
                lambda: load_tokenizer(self.model_path, self.vocab_size, self.eos_token_ids))
        return self._compiler

    def check_supported(self) -> None:
        """Raise ValueError if this model cannot take grammars (it has no tokenizer.json)."""
        check_tokenizer_file(self.model_path)

    def add_request(self, request: Request) -> None:
        params = request.sampling_params.structured_outputs
        if params is not None:
            request.grammar = self._get_compiler().submit(params)

    def start_bitmask(self, requests: list[tuple[Request | None, list[int]]]) -> Future[np.ndarray]:
        """`bitmask`, on the mask thread."""
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._mask_thread.submit(self.bitmask, requests)

    def bitmask(self, requests: list[tuple[Request | None, list[int]]]) -> np.ndarray:
        """The packed masks of the positions these requests sample in a step, each given with
        the drafts scheduled for it: a row after the last known token, then one after each
        draft; ceil(vocab / 32) int32 words a row, bit i of word w allowing token 32 w + i.
        A request that is gone (None) gets rows allowing everything."""
        num_rows = sum(1 + len(drafts) for _, drafts in requests)
        bitmask = np.empty((num_rows, self.num_words), dtype=np.int32)  # llguidance fills whole rows
        plain: list[tuple[LLMatcher, int]] = []
        row = 0
        for request, drafts in requests:
            if request is None:
                bitmask[row:row + 1 + len(drafts)] = -1
                row += 1 + len(drafts)
                continue
            matcher = request.matcher
            if not drafts:
                plain.append((matcher, row))
                row += 1
                continue
            # The drafts passed the matcher when proposed (trim_drafts), so each is accepted.
            for token_id in drafts:
                fill_next_token_bitmask(matcher, bitmask, row)
                matcher.consume_token(token_id)
                row += 1
            fill_next_token_bitmask(matcher, bitmask, row)
            matcher.rollback(len(drafts))
            row += 1
        if plain:
            fill_next_token_bitmask_par(self._executor, plain, bitmask)
        return bitmask

    def accept_tokens(self, request: Request, token_ids: list[int]) -> bool:
        """Advance the request's matcher by the tokens it keeps; whether a token came after
        the grammar's end. Past its end the mask allows only EOS, so a request that ignores
        EOS ends with that token too. (A grammar that ends is not the request's end: the EOS
        that follows is, as the frontend expects.)"""
        matcher = request.matcher
        for token_id in token_ids:
            if matcher.is_stopped():
                return True
            if not matcher.consume_token(token_id):
                raise GrammarViolation(f"the grammar refused sampled token {token_id}: {matcher.get_error()}")
        return False

    def trim_drafts(self, request: Request, draft_token_ids: list[int]) -> list[int]:
        """The drafts up to the first one the grammar refuses: no later one can be accepted."""
        return draft_token_ids[:request.matcher.validate_tokens(draft_token_ids)]

    def drain_stats_into(self, stats: SchedulerStats) -> None:
        if self._compiler is not None:
            stats.grammar_compile_seconds, stats.grammar_cache_hits, stats.grammar_cache_misses = \
                self._compiler.drain_stats()

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=True)
