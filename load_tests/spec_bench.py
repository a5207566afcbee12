"""Speculative decoding's speed-up on a copy-heavy workload, side by side in one run.

    python -m load_tests.spec_bench                      # the embedded default model
    python -m load_tests.spec_bench MODEL --batch-sizes 1 4 16 64

Prompts ask the model to repeat or lightly edit a given paragraph, where prompt lookup finds
long matches. For each batch size, the same greedy requests run through Octavo's engine
without speculation (its default: async scheduling, CUDA graphs) and with each speculative
config. It prints output tokens/s, the speed-up, the acceptance rate, the mean acceptance
length, and how many outputs are identical to those without speculation (all of them in
float32; in bfloat16 a different batch shape may flip a near-tie, as between any two
batchings). At batch 1 it also runs transformers' greedy `generate`, plain and with its own
prompt lookup (`prompt_lookup_num_tokens`), on the same model and GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine_core.llm import LLM
from engine_core.protocol import EngineCoreRequest, SamplingParams

PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens and wound the clockwork that turned it, then sat by the window with a mug of tea and watched "
    "the beam sweep across the water until the ships had passed.",
    "To make bread, mix flour, water, salt and yeast into a shaggy dough. Knead it for ten minutes until it is "
    "smooth, let it rise in a warm place for an hour, shape it into a loaf, let it rise again, and bake it in a "
    "hot oven until the crust is deep brown and the loaf sounds hollow when tapped.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and oxygen. It takes place in the chloroplasts, where chlorophyll absorbs light energy and drives the "
    "reactions that split water and fix carbon into sugar.",
    "The meeting is moved from Tuesday to Thursday at three in the afternoon. Please bring the quarterly report, "
    "the updated budget and your notes on the new hiring plan, and let me know by Wednesday if you cannot attend.",
]
INSTRUCTIONS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text, changing only the first sentence to be in the future tense:\n\n{}",
    "Copy this paragraph and then add one sentence at the end that summarizes it:\n\n{}",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def build_prompts(tokenizer, num: int) -> list[list[int]]:
    texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)].format(PARAGRAPHS[i % len(PARAGRAPHS)]) for i in range(num)]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)) for t in texts]


def run_engine(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float, dict]:
    """All prompts at once through the engine: tokens, wall seconds and spec counters."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineCoreRequest(f"b{i}-{time.monotonic_ns()}", prompt, params))
    while engine.has_unfinished_requests():
        out = engine.step()
        stats = out.scheduler_stats
        counts["drafts"] += stats.spec_num_drafts
        counts["draft_tokens"] += stats.spec_num_draft_tokens
        counts["accepted"] += stats.spec_num_accepted_tokens
        for o in out.outputs:
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    seconds = time.perf_counter() - start
    return [tokens[k] for k in sorted(tokens, key=lambda k: int(k[1:].split("-")[0]))], seconds, counts


def bench_engine(model: str | None, dtype: str, spec: dict | None, batch_sizes: list[int], rounds: int,
                 max_tokens: int, max_model_len: int) -> dict[int, dict]:
    llm = LLM(model, dtype=dtype, max_num_seqs=max(batch_sizes), max_model_len=max_model_len,
              speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    run_engine(llm, build_prompts(llm.tokenizer, 2), params)  # warm-up
    results = {}
    for batch in batch_sizes:
        outputs, seconds, counts = [], 0.0, {"drafts": 0, "draft_tokens": 0, "accepted": 0}
        prompts = build_prompts(llm.tokenizer, batch * rounds)
        # Untimed: kernel variants first met at this batch size compile here.
        run_engine(llm, prompts[:batch], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        for r in range(rounds):
            tokens, s, c = run_engine(llm, prompts[r * batch:(r + 1) * batch], params)
            outputs += tokens
            seconds += s
            counts = {k: counts[k] + c[k] for k in counts}
        num_tokens = sum(len(t) for t in outputs)
        results[batch] = {"tok_s": num_tokens / seconds, "tokens": num_tokens, "outputs": outputs,
                          "model_path": llm.engine.ready.model_path, **counts}
    del llm
    torch.cuda.empty_cache()
    return results


@torch.inference_mode()
def bench_transformers(model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    results = {}
    for name, extra in (("plain", {}), ("prompt lookup", {"prompt_lookup_num_tokens": NGRAM["num_speculative_tokens"]})):
        model.generate(torch.tensor([prompts[0]], device="cuda"), max_new_tokens=8, do_sample=False, **extra)
        torch.cuda.synchronize()
        start, num_tokens = time.perf_counter(), 0
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens,
                                 do_sample=False, **extra)
            num_tokens += out.shape[1] - len(prompt)
        torch.cuda.synchronize()
        results[name] = num_tokens / (time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", help="default: %(default)s")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="batches of each size, one after the other")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--speculative-config", action="append", default=None, metavar="JSON",
                        help=f"repeatable; default: {json.dumps(NGRAM)}")
    parser.add_argument("--hf-prompts", type=int, default=3, help="prompts transformers runs at batch 1 (0: none)")
    args = parser.parse_args()
    specs = [json.loads(s) for s in args.speculative_config] if args.speculative_config else [NGRAM]

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}")
    base = bench_engine(args.model, args.dtype, None, args.batch_sizes, args.rounds, args.max_tokens, args.max_model_len)
    rows = [("octavo, no speculation", None, base)]
    for spec in specs:
        print(f"{spec['method']} k={spec['num_speculative_tokens']}: {json.dumps(spec)}")
    for spec in specs:
        rows.append((f"octavo, {spec['method']} k={spec['num_speculative_tokens']}", spec,
                     bench_engine(args.model, args.dtype, spec, args.batch_sizes, args.rounds, args.max_tokens,
                                  args.max_model_len)))

    print(f"\n{'engine':<40} {'batch':>5} {'tok/s':>9} {'speed-up':>8} {'accept':>7} {'mean len':>8} {'same':>9}")
    for name, spec, results in rows:
        for batch, r in results.items():
            speedup = r["tok_s"] / base[batch]["tok_s"]
            accept = f"{r['accepted'] / r['draft_tokens']:.1%}" if r["draft_tokens"] else "-"
            mean_len = f"{1 + r['accepted'] / r['drafts']:.2f}" if r["drafts"] else "-"
            same = sum(a == b for a, b in zip(r["outputs"], base[batch]["outputs"]))
            print(f"{name:<40} {batch:>5} {r['tok_s']:>9.1f} {speedup:>7.2f}x {accept:>7} {mean_len:>8} "
                  f"{same:>4}/{len(r['outputs'])}")

    if args.hf_prompts and torch.cuda.is_available():
        from transformers import AutoTokenizer

        model_dir = next(iter(base.values()))["model_path"]
        prompts = build_prompts(AutoTokenizer.from_pretrained(model_dir), args.hf_prompts)
        for name, tok_s in bench_transformers(model_dir, prompts, args.max_tokens).items():
            print(f"{'transformers generate, ' + name:<40} {1:>5} {tok_s:>9.1f} "
                  f"{tok_s / base[1]['tok_s'] if 1 in base else float('nan'):>7.2f}x")


if __name__ == "__main__":
    main()
