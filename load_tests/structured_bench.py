"""The cost of structured outputs: the same decode batch with a JSON schema on every request
and without, on the offline engine, and the grammar compile time and cache hits.

    python -m load_tests.structured_bench                        # batch 64, the default model
    python -m load_tests.structured_bench --batch 4 --output-len 16   # a quick run on a CPU
    python -m load_tests.structured_bench --json-schema FILE     # your schema instead

Each request decodes exactly --output-len tokens (ignore_eos; the default schema, an array of
at least 200 records, does not end sooner, so every step masks every row), temperature 0.6,
prompts of --prompt-len random token ids. The step time is the median over the steps in which
the whole batch decodes. Each run also prints its host time per step, call by call: the mask
fill (on the mask thread), the matcher advance, and the engine's scheduler and executor calls
(on the busy loop; the executor's include the in-process worker's host work). `--async-scheduling
off` runs both in COLLECT_FIRST mode (the one speculative decoding uses), to compare the overlap
of mask filling with the forward there.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from engine_core.llm import LLM
from engine_core.protocol import SamplingParams, StructuredOutputsParams

# Records of bounded fields, at least 200 of them (thousands of tokens): within --output-len
# the grammar stays live, so every step masks every row.
DEFAULT_SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000},
                   "name": {"type": "string", "maxLength": 24},
                   "status": {"enum": ["pending", "shipped", "delivered"]},
                   "price": {"type": "number"}},
    "required": ["id", "name", "status", "price"], "additionalProperties": False}}


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, float]:
    step_s: list[float] = []
    compile_s = hits = misses = 0.0
    engine_step = llm.engine.step
    batch = len(prompts)

    def timed_step():
        nonlocal compile_s, hits, misses
        start = time.perf_counter()
        outputs = engine_step()
        elapsed = time.perf_counter() - start
        stats = outputs.scheduler_stats
        if stats.num_running_reqs == batch and stats.num_batched_tokens == batch:
            step_s.append(elapsed)
        compile_s += stats.grammar_compile_seconds
        hits += stats.grammar_cache_hits
        misses += stats.grammar_cache_misses
        return outputs

    # The step's host work, call by call: the grammar's (filling masks, on the mask thread,
    # and advancing matchers) and the engine's calls on the busy loop.
    engine = llm.engine
    timed_calls = {"bitmask": (engine.structured_output, "bitmask"),
                   "accept_tokens": (engine.structured_output, "accept_tokens"),
                   "schedule": (engine.scheduler, "schedule"),
                   "update_from_output": (engine.scheduler, "update_from_output"),
                   "launch": (engine.executor, "launch"),
                   "sample_under_grammar": (engine.executor, "sample_under_grammar"),
                   "collect": (engine.executor, "collect")}
    host_s = dict.fromkeys(timed_calls, 0.0)

    def timed_method(label: str, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                host_s[label] += time.perf_counter() - start
        return timed

    engine.step = timed_step
    for label, (owner, name) in timed_calls.items():
        setattr(owner, name, timed_method(label, getattr(owner, name)))
    try:
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
    finally:
        del engine.step
        for owner, name in timed_calls.values():
            delattr(owner, name)
    assert all(o.finish_reason == "length" for o in outs), [o.finish_reason for o in outs]
    # Per decoded token of the batch: one step's host work.
    per_step_us = {label: seconds / max_len(outs) * 1e6 for label, seconds in host_s.items()}
    return {"step_ms": statistics.median(step_s) * 1e3 if step_s else float("nan"), "steps": len(step_s),
            "wall_s": wall, "compile_ms": compile_s * 1e3, "hits": hits, "misses": misses,
            "host_us": per_step_us}


def max_len(outs) -> int:
    return max(len(o.token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json-schema", default=None, help="a file holding the JSON schema every request gets")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    args = parser.parse_args()

    schema = json.dumps(DEFAULT_SCHEMA) if args.json_schema is None else open(args.json_schema).read()
    async_scheduling = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    llm = LLM(args.model, async_scheduling=async_scheduling, max_model_len=args.prompt_len + args.output_len)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 10000) for _ in range(args.prompt_len)] for _ in range(args.batch)]

    def params(structured: StructuredOutputsParams | None) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.6, seed=i, max_tokens=args.output_len, ignore_eos=True,
                               structured_outputs=structured) for i in range(args.batch)]

    run(llm, prompts[:2], params(None)[:2])  # warm-up
    plain = run(llm, prompts, params(None))
    constrained = run(llm, prompts, params(StructuredOutputsParams(json=schema)))
    again = run(llm, prompts, params(StructuredOutputsParams(json=schema)))  # every grammar cached
    plain = min(plain, run(llm, prompts, params(None)), key=lambda r: r["step_ms"])  # either side of them
    print(f"{llm.engine.ready.device} ({llm.engine.ready.dtype}), step mode {llm.engine.step_mode.name}, "
          f"batch {args.batch}, prompt {args.prompt_len}, output {args.output_len}")
    for name, r in (("no grammar", plain), ("json schema", constrained), ("json schema, cached", again)):
        print(f"{name:<20} median step {r['step_ms']:8.3f} ms over {r['steps']:4d} full steps, wall {r['wall_s']:7.2f} s,"
              f" compile {r['compile_ms']:7.2f} ms, cache hits {r['hits']:.0f} misses {r['misses']:.0f}")
        print(f"{'':<20} host per step (us): " + ", ".join(f"{label} {us:.0f}" for label, us in r["host_us"].items()))
    print(f"step-time cost of the schema: {(again['step_ms'] / plain['step_ms'] - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
