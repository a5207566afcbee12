"""The fused sampling kernel on a CUDA GPU at the real vocabulary size (skipped without one).

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_sampler_gpu.py -q
    PYTHONPATH=$PWD python tests/gpu/test_sampler_gpu.py --bench   # old torch path vs fused kernel

- Greedy rows: exactly torch's argmax (the first column among ties), in bf16, fp16 and fp32.
- Sampled rows: one row of 151936 bf16 logits repeated over 2^17 rows (a stride-0 view), each
  row its own seed. Tokens are pooled into 32 buckets of about equal probability (in order of
  probability, so the tail of the vocabulary has its buckets too) and the counts are checked
  with a chi-square test against softmax(logits / T) computed in float64; the same counts
  must fail against a temperature 10% off.
- A row's token is a function of its logits, temperature and seed: not of the batch.
- The sampler routes rows needing processors to the torch path and the others to the kernel;
  through the engine, a seeded request's tokens do not depend on the requests beside it.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from workers.sampler import Sampler, SamplingMetadata

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 151936  # Qwen3
ALPHA = 1e-4
DEVICE = "cuda"


def metadata(temperature: torch.Tensor, **fields) -> SamplingMetadata:
    """A step's metadata with every processor off unless given."""
    defaults = dict(
        temperature=temperature, all_greedy=bool((temperature == 0).all()), top_p=None, top_k=None,
        min_p=None, generators={}, seeds=None, torch_rows=None, presence_penalty=None,
        frequency_penalty=None, repetition_penalty=None, output_token_counts=None,
        prompt_token_mask=None, bias_rows=None, bias_token_ids=None, bias_values=None, ban_rows=None,
        ban_token_ids=None, max_num_logprobs=-1)
    return SamplingMetadata(**{**defaults, **fields})


def random_seeds(n: int) -> torch.Tensor:
    return torch.randint(0, 2 ** 63 - 1, (n,), device=DEVICE)


def bucket_pvalue(tokens: torch.Tensor, probs: torch.Tensor, num_buckets: int = 32) -> float:
    """Chi-square p-value of `tokens` under `probs` [vocab] (float64), over buckets of about
    1/num_buckets of the mass each, filled in decreasing order of probability."""
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    bucket = (mass_before * num_buckets).long().clamp(max=num_buckets - 1)
    bucket_of = torch.empty_like(order)
    bucket_of[order] = bucket
    expected = torch.zeros(num_buckets, dtype=torch.float64, device=probs.device).index_add(0, bucket, sorted_probs)
    observed = torch.bincount(bucket_of[tokens], minlength=num_buckets).double()
    used = expected > 0
    expected = expected[used] * len(tokens)
    statistic = ((observed[used] - expected) ** 2 / expected).sum()
    df = torch.tensor((int(used.sum()) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, statistic.cpu() / 2).item()


def draw_fused(row: torch.Tensor, temperature: float, batches: int = 64, batch: int = 2048) -> torch.Tensor:
    from kernels.triton_sampling import sample_gumbel

    temps = torch.full((batch,), temperature, device=DEVICE)
    return torch.cat([sample_gumbel(row.expand(batch, -1), temps, random_seeds(batch)) for _ in range(batches)])


# Distributions over the whole vocabulary: spread over most tokens, a realistic spread, and a
# peaked one whose top token carries most of the mass.
def flat_row() -> torch.Tensor:
    return torch.randn(VOCAB, device=DEVICE) * 0.5


def spread_row() -> torch.Tensor:
    return torch.randn(VOCAB, device=DEVICE) * 2.5


def peaked_row() -> torch.Tensor:
    row = torch.randn(VOCAB, device=DEVICE) * 2.0
    row[torch.randint(VOCAB, (5,))] += torch.tensor([24.0, 22.0, 21.0, 20.0, 18.0], device=DEVICE)
    return row


@pytest.mark.parametrize("make_row", [flat_row, spread_row, peaked_row])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampled_rows_follow_softmax(make_row, temperature: float) -> None:
    torch.manual_seed(0)
    row = make_row().to(torch.bfloat16)
    tokens = draw_fused(row, temperature)
    probs = (row.double() / temperature).softmax(0)
    assert bucket_pvalue(tokens, probs) > ALPHA
    assert bucket_pvalue(tokens, (row.double() / (temperature * 1.1)).softmax(0)) < ALPHA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_rows_are_exact(dtype: torch.dtype) -> None:
    from kernels.triton_sampling import sample_gumbel

    torch.manual_seed(0)
    logits = (torch.randn(256, VOCAB, device=DEVICE) * 3).to(dtype)
    # Ties between two columns in different splits, and a max in the last column.
    for r in range(0, 256, 8):
        first, second = sorted(torch.randperm(VOCAB)[:2].tolist())
        logits[r, first] = logits[r, second] = 40.0
    logits[5, -1] = 50.0
    temperature = torch.where(torch.arange(256, device=DEVICE) % 3 == 0, 0.0, 0.7)
    tokens = sample_gumbel(logits, temperature, random_seeds(256))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    all_greedy = sample_gumbel(logits, torch.zeros(256, device=DEVICE), random_seeds(256))
    assert torch.equal(all_greedy, logits.argmax(-1))
    assert ((tokens >= 0) & (tokens < VOCAB)).all()


def test_token_depends_on_seed_alone() -> None:
    from kernels.triton_sampling import sample_gumbel

    torch.manual_seed(0)
    logits = (torch.randn(256, VOCAB, device=DEVICE) * 2).to(torch.bfloat16)
    temperature = torch.rand(256, device=DEVICE) + 0.5
    seeds = random_seeds(256)
    tokens = sample_gumbel(logits, temperature, seeds)
    assert torch.equal(sample_gumbel(logits, temperature, seeds), tokens)
    perm = torch.randperm(256, device=DEVICE)
    assert torch.equal(sample_gumbel(logits[perm], temperature[perm], seeds[perm]), tokens[perm])
    for r in (0, 17, 255):
        assert torch.equal(sample_gumbel(logits[r:r + 1], temperature[r:r + 1], seeds[r:r + 1]), tokens[r:r + 1])
    assert torch.equal(sample_gumbel(logits, temperature, seeds, split_size=4096, block_size=512), tokens)
    # Other seeds, other tokens (these rows spread their mass over thousands of tokens).
    assert (sample_gumbel(logits, temperature, seeds + 1) != tokens).float().mean() > 0.9


def test_sampler_routes_rows() -> None:
    from kernels.triton_sampling import sample_gumbel

    torch.manual_seed(0)
    logits = (torch.randn(64, VOCAB, device=DEVICE) * 2).to(torch.bfloat16)
    temperature = torch.full((64,), 0.8, device=DEVICE)
    seeds = random_seeds(64)
    torch_rows = torch.arange(64, device=DEVICE) % 4 == 0
    top_k = torch.where(torch_rows, 1, VOCAB)  # top-k 1 on the torch rows: a max (bf16 ties)
    md = metadata(temperature, top_k=top_k, seeds=seeds, torch_rows=torch_rows, max_num_logprobs=3)
    out = Sampler()(logits, md)
    fused = sample_gumbel(logits, temperature, seeds)
    assert torch.equal(out.sampled_token_ids[~torch_rows], fused[~torch_rows])
    chosen = logits.gather(1, out.sampled_token_ids[:, None])[:, 0]
    assert torch.equal(chosen[torch_rows], logits.max(-1).values[torch_rows])
    raw = logits.float().log_softmax(-1)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.logprobs[:, 1:], raw.topk(3, dim=-1).values)


def test_engine_seeded_request_is_batch_independent(tmp_path) -> None:
    import random

    import transformers

    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=512, vocab_size=VOCAB,
                                      max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=512, enforce_eager=True, max_num_seqs=16,
              kv_cache_memory=1 << 30)  # several engines share the GPU in one test session
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    alone = llm.generate([prompt], seeded)[0].token_ids
    rng = random.Random(0)
    others = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 50))] for _ in range(7)]
    # Neighbours with top-p and penalties take the torch path; the seeded row stays fused.
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, presence_penalty=0.5, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=16, ignore_eos=True)] * 3
    batched = llm.generate(others[:3] + [prompt] + others[3:], params[:3] + [seeded] + params[3:7])
    assert batched[3].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                       ignore_eos=True))[0].token_ids
    assert other_seed != alone


# ------------------------------------------------------------------------------------- bench

def bench() -> None:
    from triton.testing import do_bench

    from kernels.triton_sampling import sample_gumbel

    print(f"{torch.cuda.get_device_name()}; vocab {VOCAB}, bf16 logits; median GPU ms (do_bench)")
    print(f"{'batch':>5} {'mode':<8} {'old: .float()+torch':>20} {'new: sampler':>13} {'kernel':>8} {'speed-up':>9}")
    sampler = Sampler()
    for batch in (1, 16, 64, 256):
        torch.manual_seed(0)
        logits = (torch.randn(batch, VOCAB, device=DEVICE) * 3).to(torch.bfloat16)
        seeds = random_seeds(batch)
        for mode, temp in (("T=0.6", 0.6), ("greedy", 0.0)):
            temperature = torch.full((batch,), temp, device=DEVICE)
            old_md, new_md = metadata(temperature), metadata(temperature, seeds=seeds)
            old = do_bench(lambda: sampler(logits.float(), old_md), return_mode="median")
            new = do_bench(lambda: sampler(logits, new_md), return_mode="median")
            kernel = do_bench(lambda: sample_gumbel(logits, temperature, seeds), return_mode="median")
            print(f"{batch:>5} {mode:<8} {old:>20.4f} {new:>13.4f} {kernel:>8.4f} {old / new:>8.1f}x")

    print("\nkernel configurations (T=0.6), median ms:")
    for batch in (1, 256):
        logits = (torch.randn(batch, VOCAB, device=DEVICE) * 3).to(torch.bfloat16)
        temperature = torch.full((batch,), 0.6, device=DEVICE)
        seeds = random_seeds(batch)
        results = []
        for split in (4096, 8192, 16384):
            for block in (512, 1024, 2048):
                for warps in (2, 4, 8):
                    ms = do_bench(lambda: sample_gumbel(logits, temperature, seeds, split, block, warps),
                                  return_mode="median")
                    results.append((ms, split, block, warps))
        results.sort()
        print(f"batch {batch}: " + ", ".join(f"split {s} block {b} warps {w}: {ms:.4f}"
                                             for ms, s, b, w in results[:6]))
        print(f"batch {batch} slowest: {results[-1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true")
    if parser.parse_args().bench:
        bench()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
