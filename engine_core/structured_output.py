"""Structured outputs in the engine core: each request's grammar matcher, the token bitmask
of every position a step samples, and the matcher's advance by the tokens kept.

The matchers live here, beside the scheduler, as in vLLM V1: the scheduler knows which
positions a step samples (drafts included), fills their masks with the matchers' state after
the previous step's tokens, and ships them packed in the SchedulerOutput; the worker applies
them to the logits on the device before sampling. A matcher advances only by tokens the
request keeps; draft positions are masked by advancing it through the drafts and rolling it
back. Which is why a grammar request is never scheduled with a token in flight: the engine
collects each step before scheduling the next while one runs (engine.py).
"""

from __future__ import annotations

from concurrent.futures import Future

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
    """The grammar side of the scheduler. The compile thread starts with the first grammar
    request, and loads the tokenizer then, so engines that never see one pay nothing."""

    def __init__(self, model_path: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_words = -(-vocab_size // 32)
        self._compiler: GrammarCompiler | None = None
        self._executor = llguidance.LLExecutor()

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

    @staticmethod
    def matcher(request: Request) -> LLMatcher:
        return request.grammar.result()

    @staticmethod
    def is_ready(request: Request) -> bool:
        """Whether the request may be scheduled: no grammar, or its matcher is built (a failed
        build is ready too: the scheduler then finishes the request with its error)."""
        return request.grammar is None or request.grammar.done()

    @staticmethod
    def build_error(request: Request) -> str | None:
        grammar: Future[LLMatcher] = request.grammar
        error = grammar.exception()
        return None if error is None else str(error)

    def bitmask(self, requests: list[Request]) -> bytes:
        """The packed masks of the positions these requests sample this step: a row after the
        last known token, then one after each draft (see SchedulerOutput.grammar_bitmask)."""
        num_rows = sum(1 + len(r.spec_token_ids) for r in requests)
        bitmask = np.full((num_rows, self.num_words), -1, dtype=np.int32)
        plain: list[tuple[LLMatcher, int]] = []
        row = 0
        for request in requests:
            matcher = self.matcher(request)
            if not request.spec_token_ids:
                plain.append((matcher, row))
                row += 1
                continue
            # The drafts passed the matcher when proposed (trim_drafts), so each is accepted.
            for token_id in request.spec_token_ids:
                fill_next_token_bitmask(matcher, bitmask, row)
                matcher.consume_token(token_id)
                row += 1
            fill_next_token_bitmask(matcher, bitmask, row)
            matcher.rollback(len(request.spec_token_ids))
            row += 1
        if plain:
            fill_next_token_bitmask_par(self._executor, plain, bitmask)
        return bitmask.tobytes()

    def accept_tokens(self, request: Request, token_ids: list[int]) -> bool:
        """Advance the request's matcher by the tokens it keeps; whether a token came after
        the grammar's end. Past its end the mask allows only EOS, so a request that ignores
        EOS ends with that token too. (A grammar that ends is not the request's end: the EOS
        that follows is, as the frontend expects.)"""
        matcher = self.matcher(request)
        for token_id in token_ids:
            if matcher.is_stopped():
                return True
            if not matcher.consume_token(token_id):
                raise GrammarViolation(f"the grammar refused sampled token {token_id}: {matcher.get_error()}")
        return False

    def trim_drafts(self, request: Request, draft_token_ids: list[int]) -> list[int]:
        """The drafts up to the first one the grammar refuses: no later one can be accepted."""
        return draft_token_ids[:self.matcher(request).validate_tokens(draft_token_ids)]

    def drain_stats_into(self, stats: SchedulerStats) -> None:
        if self._compiler is not None:
            stats.grammar_compile_seconds, stats.grammar_cache_hits, stats.grammar_cache_misses = \
                self._compiler.drain_stats()

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
