"""Grammars for structured outputs, by llguidance (docs/design.md says why this library).

The API process checks a request's grammar here (`check_grammar`) with the model's tokenizer
before the engine sees it, so a bad schema or regex is the client's 400. The engine core
builds each request's matcher on a background thread (`GrammarCompiler`), cached by grammar.
No torch: both processes import this.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import msgspec
from llguidance import LLMatcher, LLTokenizer

from engine_core.protocol import StructuredOutputsParams

# JSON is written compact (",", ":" and no other whitespace): free whitespace lets a small
# model pad its output with newlines until max_tokens instead of finishing the object.
_JSON_OPTIONS = {"whitespace_flexible": False}
# Grammars kept built; a hit copies the built matcher instead of building it again.
MAX_CACHED_GRAMMARS = 256


def check_tokenizer_file(model_path: str) -> Path:
    """The tokenizer file grammars are built against; ValueError if the model has none."""
    path = Path(model_path) / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"structured outputs need the model's tokenizer.json, which {model_path} lacks")
    return path


def load_tokenizer(model_path: str, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """The model's tokenizer as llguidance needs it (a second or so for a large vocabulary):
    its masks are `vocab_size` wide (the logits', which may exceed the tokenizer's), and EOS
    ends a grammar's output."""
    path = check_tokenizer_file(model_path)
    return LLTokenizer(str(path), n_vocab=vocab_size, eos_token=eos_token_ids)


def grammar_source(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint; ValueError if its text is not even well formed."""
    if params.json is not None or params.json_object:
        schema = params.json if params.json is not None else '{"type": "object"}'
        return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if params.regex is not None:
        return llguidance.grammar_from("regex", params.regex)
    if params.choice is not None:
        return llguidance.grammar_from("choice", msgspec.json.encode(params.choice).decode())
    return llguidance.grammar_from("grammar", params.grammar)


def check_grammar(params: StructuredOutputsParams, tokenizer: LLTokenizer) -> None:
    """Raise ValueError saying what is wrong with the constraint's grammar: a malformed or
    unsupported JSON schema (an unknown keyword is refused, never ignored), an invalid regex
    or EBNF grammar."""
    params.validate()
    try:
        error = LLMatcher.validate_grammar(grammar_source(params), tokenizer)
    except ValueError as e:  # not even well formed (a schema that is not JSON)
        error = str(e)
    if error:
        raise ValueError(f"{params.kind}: {error}")


class GrammarCompiler:
    """Builds requests' matchers on one background thread, so the busy loop never waits on a
    grammar. Each distinct grammar is built once (llguidance builds its lexer and parser
    lazily, as masks need them) and kept; each request gets a copy, its own matcher state.

    The cache and the counters belong to the thread; `drain_stats` reads the counters."""

    def __init__(self, load_tokenizer: Callable[[], LLTokenizer]) -> None:
        self._load_tokenizer = load_tokenizer
        self._tokenizer: LLTokenizer | None = None  # loaded on the thread, by the first build
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._cache: OrderedDict[bytes, LLMatcher] = OrderedDict()
        self._stats_lock = threading.Lock()
        self._compile_seconds = 0.0
        self._hits = self._misses = 0

    def submit(self, params: StructuredOutputsParams) -> Future[LLMatcher]:
        return self._pool.submit(self._matcher, params)

    def _matcher(self, params: StructuredOutputsParams) -> LLMatcher:
        key = msgspec.msgpack.encode(params)
        built = self._cache.get(key)
        if built is not None:
            self._cache.move_to_end(key)
            with self._stats_lock:
                self._hits += 1
            return built.deep_copy()
        start = time.perf_counter()
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        built = LLMatcher(self._tokenizer, grammar_source(params))
        if built.is_error():
            raise ValueError(f"{params.kind}: {built.get_error()}")
        with self._stats_lock:
            self._misses += 1
            self._compile_seconds += time.perf_counter() - start
        self._cache[key] = built
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return built.deep_copy()

    def drain_stats(self) -> tuple[float, int, int]:
        """Compile seconds, cache hits and misses since the last call."""
        with self._stats_lock:
            stats = (self._compile_seconds, self._hits, self._misses)
            self._compile_seconds, self._hits, self._misses = 0.0, 0, 0
        return stats

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
