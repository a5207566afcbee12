"""The two grammar libraries made for constrained decoding, measured on the CPU where their
work runs: llguidance and xgrammar, against the default model's tokenizer.

    python -m load_tests.grammar_backend_bench [--tokenizer DIR] [--batch 64] [--steps 40]

For each grammar (three JSON schemas, a regex, a choice): the time to compile it (xgrammar
builds a token-mask cache up front; llguidance builds its parser lazily, so its figure is the
matcher's construction plus the first mask), and the time to fill one step's token bitmask for
`--batch` requests and advance each by its token, per step. The requests walk the tokens of a
valid instance, each starting at a different offset so the batch holds every parse state.
Either library may be missing; its rows are then skipped. This decided the engine's library
(docs/design.md, "Structured outputs").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "email", "tags"],
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                           "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "qty", "price"]}},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["id", "status", "items", "note"],
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "when": {"type": "object", "properties": {"year": {"type": "integer"}, "month": {"type": "integer"},
                                                  "day": {"type": "integer"}},
                 "required": ["year", "month", "day"]},
        "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "online": {"type": "boolean"},
    },
    "required": ["title", "when", "attendees", "online"],
}
INSTANCES = {
    "person": (PERSON, {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com",
                        "tags": ["math", "poetry", "engines"]}),
    "order": (ORDER, {"id": 1234, "status": "shipped", "items": [{"sku": "A-1", "qty": 2, "price": 9.5},
                                                                 {"sku": "B-22", "qty": 1, "price": 100}],
                      "note": None}),
    "event": (EVENT, {"title": "Octavo launch", "when": {"year": 2025, "month": 5, "day": 17},
                      "attendees": ["ada", "alan", "grace"], "online": True}),
}
REGEX = r"\d{3}-\d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]


def cases() -> list[tuple[str, str, object, str]]:
    """(name, kind, spec, a valid output) for each grammar measured."""
    out = [(name, "json", json.dumps(schema), json.dumps(instance)) for name, (schema, instance) in INSTANCES.items()]
    out.append(("regex", "regex", REGEX, "555-867-5309"))
    out.append(("choice", "choice", CHOICES, "negative"))
    return out


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.ll, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.executor = llguidance.LLExecutor()

    def compile(self, kind: str, spec: object):
        m = self.ll.LLMatcher
        if kind == "json":
            grammar = m.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = m.grammar_from_regex(spec)
        else:
            grammar = m.grammar_from_regex("(" + "|".join(map(_escape, spec)) + ")")
        matcher = m(self.tokenizer, grammar)
        bitmask = self.lt.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        self.lt.fill_next_token_bitmask(matcher, bitmask, 0)  # the parser is built lazily
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matchers(self, grammar, n: int) -> list:
        return [self.ll.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(n, self.tokenizer.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(len(matchers)))), bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def reset(self, matcher) -> None:
        matcher.reset()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar
        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False)
        self.batch_matcher = xgrammar.BatchGrammarMatcher()

    def compile(self, kind: str, spec: object):
        if kind == "json":
            return self.compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))

    def matchers(self, grammar, n: int) -> list:
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.info.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def reset(self, matcher) -> None:
        matcher.reset()


def _escape(text: str) -> str:
    import re
    return re.escape(text)


def measure(backend, tokenizer, batch: int, steps: int) -> None:
    for name, kind, spec, valid in cases():
        start = time.perf_counter()
        grammar = backend.compile(kind, spec)
        compile_ms = (time.perf_counter() - start) * 1e3
        tokens = tokenizer.encode(valid, add_special_tokens=False) + [tokenizer.eos_token_id]
        matchers = backend.matchers(grammar, batch)
        bitmask = backend.bitmask(batch)
        position = [i % len(tokens) for i in range(batch)]
        for matcher, p in zip(matchers, position):  # spread the batch over the parse states
            for token in tokens[:p]:
                backend.accept(matcher, token)
        fill_s = accept_s = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            backend.fill(matchers, bitmask)
            fill_s += time.perf_counter() - start
            start = time.perf_counter()
            for i, matcher in enumerate(matchers):
                backend.accept(matcher, tokens[position[i]])
                position[i] += 1
                if position[i] == len(tokens):  # the stop token ended it: start over
                    backend.reset(matcher)
                    position[i] = 0
            accept_s += time.perf_counter() - start
        print(f"{backend.name:<11} {name:<7} compile {compile_ms:8.2f} ms   batch {batch}: fill "
              f"{fill_s / steps * 1e3:7.3f} ms/step, accept {accept_s / steps * 1e3:6.3f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(Path.home() / ".cache/octavo/SmolLM2-135M-Instruct"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"tokenizer {args.tokenizer} (vocab {len(tokenizer)}), {torch.get_num_threads()} CPU threads")
    for make in (LLGuidance, XGrammar):
        try:
            start = time.perf_counter()
            backend = make(tokenizer)
        except ImportError as e:
            print(f"{make.name}: not installed ({e})")
            continue
        print(f"{make.name}: tokenizer set-up {(time.perf_counter() - start) * 1e3:.0f} ms")
        measure(backend, tokenizer, args.batch, args.steps)


if __name__ == "__main__":
    main()
