"""Sampler tests on the CPU.

- The torch path (`workers.sampler.Sampler` without seeds), the reference for every feature:
  greedy, temperature, top-k, top-p, min-p, penalties, logit bias, min_tokens bans, seeded
  determinism, logprobs of the raw distribution.
- The fused path's routing (`seeds` given): on the CPU `kernels.ops.sample_gumbel` runs the
  torch reference `kernels.reference.sample_gumbel`, and rows needing processors still go
  through the torch path.
- The Triton kernel (`kernels.triton_sampling`) under the interpreter, in a subprocess as in
  tests/test_kernels.py: greedy rows exact, sampled rows distributed as softmax(logits / T),
  tokens a function of (seed, logits) alone. Each program costs ~20 ms there, so its
  statistical check draws 600 samples; tests/gpu/test_sampler_gpu.py draws ~10^5 at the real
  vocabulary size.

Distributions are checked with a chi-square test on the token counts (p-value above
`ALPHA`) plus "no sample where the probability is 0"; each such test also shows that the
same samples fail the check against a slightly wrong distribution, so the check has power.
Draws come from seeded generators: the tests are deterministic.
"""

from __future__ import annotations

import sys
from typing import Callable

import random

import msgspec
import numpy as np
import pytest
import torch

from engine_core.protocol import GREEDY_TEMPERATURE, SamplingParams
from kernels import reference
from load_tests.gpu_inputs import sampling_metadata
from triton_interpreter import interpreter_tests, run_cases
from workers.sampler import Sampler, SamplingMetadata
from workers.sampling_metadata import _SEED_MIX, seed_keys

ALPHA = 1e-4  # a correct sampler fails a check this rarely; the draws are seeded anyway
LOGITS = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5, 0.0, -0.5, 2.2])


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of the samples `tokens` under `probs` [vocab]; 0 when a token of probability 0
    was drawn. Categories expected fewer than 5 times are pooled, as the test requires."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    probs = probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * len(tokens)
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    observed = torch.cat((counts[big], counts[small].sum().view(1)))
    expected = torch.cat((expected[big], expected[small].sum().view(1)))
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, statistic / 2).item()


def samples_match(tokens: torch.Tensor, probs: torch.Tensor) -> bool:
    return chi_square_pvalue(tokens, probs) > ALPHA


def metadata(temperature: torch.Tensor | list[float], **fields) -> SamplingMetadata:
    """A step's metadata with every processor off unless given."""
    return sampling_metadata(torch.as_tensor(temperature, dtype=torch.float32), **fields)


def draw(logits: torch.Tensor, n: int, temperature: float, **fields) -> torch.Tensor:
    """n torch-path samples of one row of logits, as n rows of one step."""
    md = metadata([temperature] * n, **{k: v.expand(n) if isinstance(v, torch.Tensor) else v
                                          for k, v in fields.items()})
    return Sampler()(logits.expand(n, -1).clone(), md).sampled_token_ids


def top_p_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches top_p, renormalized."""
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[mass_before < top_p]] = probs[order[mass_before < top_p]]
    return kept / kept.sum()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------ the torch path

def test_chi_square_check_tells_right_from_wrong() -> None:
    probs = (LOGITS / 0.7).softmax(0)
    tokens = torch.multinomial(probs, 20000, replacement=True)
    assert samples_match(tokens, probs)
    assert not samples_match(tokens, (LOGITS / 0.75).softmax(0))
    zeroed = probs.clone()
    zeroed[3] = 0
    assert not samples_match(tokens, zeroed / zeroed.sum())


def test_a_tiny_temperature_becomes_greedy() -> None:
    for params in (SamplingParams(temperature=1e-6), msgspec.structs.replace(SamplingParams(), temperature=1e-6),
                   msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams(temperature=1e-6)),
                                          type=SamplingParams)):
        assert params.temperature == 0.0 and params.is_greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE).temperature == GREEDY_TEMPERATURE
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1e-6).validate()


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(6, 50)
    requested = [0.0, 1.0, 0.0, 0.5, 1e-6, 0.0]
    # The workers see temperatures as SamplingParams leaves them: tiny ones are 0.
    temperature = [SamplingParams(temperature=t).temperature for t in requested]
    sampled = Sampler()(logits.clone(), metadata(temperature)).sampled_token_ids
    greedy = torch.tensor([t < GREEDY_TEMPERATURE for t in requested])
    assert torch.equal(sampled[greedy], logits.argmax(-1)[greedy])
    assert torch.equal(Sampler()(logits.clone(), metadata([0.0] * 6)).sampled_token_ids, logits.argmax(-1))


def test_temperature() -> None:
    tokens = draw(LOGITS, 20000, 0.7)
    assert samples_match(tokens, (LOGITS / 0.7).softmax(0))
    assert not samples_match(tokens, LOGITS.softmax(0))
    assert not samples_match(tokens, (LOGITS / 0.75).softmax(0))


def test_top_k() -> None:
    tokens = draw(LOGITS, 20000, 1.0, top_k=torch.tensor([3]))
    expected = torch.where(LOGITS >= LOGITS.topk(3).values[-1], LOGITS, float("-inf")).softmax(0)
    assert samples_match(tokens, expected)
    wrong = torch.where(LOGITS >= LOGITS.topk(4).values[-1], LOGITS, float("-inf")).softmax(0)
    assert not samples_match(tokens, wrong)


def test_top_p() -> None:
    probs = LOGITS.softmax(0)  # sorted: .31 .25 .15 .11 .09 ...
    tokens = draw(LOGITS, 20000, 1.0, top_p=torch.tensor([0.7]))
    assert samples_match(tokens, top_p_probs(probs, 0.7))
    assert not samples_match(tokens, top_p_probs(probs, 0.8))
    assert not samples_match(tokens, probs)


def test_top_p_keeps_the_top_token_and_combines_with_top_k() -> None:
    tokens = draw(LOGITS, 100, 1.0, top_p=torch.tensor([1e-4]))
    assert (tokens == LOGITS.argmax()).all()
    tokens = draw(LOGITS, 20000, 1.0, top_k=torch.tensor([4]), top_p=torch.tensor([0.7]))
    top4 = torch.where(LOGITS >= LOGITS.topk(4).values[-1], LOGITS, float("-inf")).softmax(0)
    assert samples_match(tokens, top_p_probs(top4, 0.7))


def test_min_p() -> None:
    probs = (LOGITS / 0.8).softmax(0)
    tokens = draw(LOGITS, 20000, 0.8, min_p=torch.tensor([0.3]))
    kept = torch.where(probs >= 0.3 * probs.max(), probs, 0.0)
    assert samples_match(tokens, kept / kept.sum())
    looser = torch.where(probs >= 0.2 * probs.max(), probs, 0.0)
    assert not samples_match(tokens, looser / looser.sum())


def test_penalties_follow_their_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    prompt = torch.tensor([[False, False, True, False], [True, False, False, False]])
    md = metadata([1.0, 1.0], repetition_penalty=torch.tensor([2.0, 1.0]),
                  frequency_penalty=torch.tensor([0.5, 0.25]), presence_penalty=torch.tensor([0.1, 1.0]),
                  output_token_counts=counts, prompt_token_mask=prompt)
    out = Sampler.apply_logits_processors(logits.clone(), md)
    # Repetition first (seen in prompt or output: positive / 2, negative * 2), then
    # frequency (per count) and presence (once).
    expected = torch.tensor([[2.0 / 2 - 0.5 * 2 - 0.1, -1.0 * 2 - 0.5 - 0.1, 0.5 / 2, 3.0],
                             [1.0, 1.0, -2.0 - 0.25 * 3 - 1.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    md = metadata([0.0], repetition_penalty=torch.tensor([2.0]), output_token_counts=torch.tensor([[1.0, 0, 0]]),
                  prompt_token_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert Sampler()(logits.clone(), md).sampled_token_ids.item() == 1


def test_logit_bias_and_bans() -> None:
    logits = torch.zeros(3, 6)
    logits[:, 2] = 5.0
    md = metadata([0.0, 0.0, 1.0], bias_rows=torch.tensor([0, 0]), bias_token_ids=torch.tensor([4, 2]),
                  bias_values=torch.tensor([10.0, -10.0]), ban_rows=torch.tensor([1, 2, 2]),
                  ban_token_ids=torch.tensor([2, 2, 0]))
    sampled = Sampler()(logits.clone(), md).sampled_token_ids
    assert sampled[0] == 4  # biased up; token 2 biased down
    assert sampled[1] != 2  # banned: the greedy choice moves to the next best (first tie: 0)
    assert sampled[1] == 0
    # A banned token is never sampled, however likely.
    tokens = draw(torch.tensor([0.0, 0.0, 8.0, 0.0]), 2000, 1.0, ban_rows=torch.arange(2000),
                  ban_token_ids=torch.full((2000,), 2))
    assert samples_match(tokens, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(2, 10)
    md = metadata([0.0, 0.0], bias_rows=torch.tensor([1]), bias_token_ids=torch.tensor([7]),
                  bias_values=torch.tensor([100.0]), max_num_logprobs=2)
    out = Sampler()(logits.clone(), md)
    raw = logits.log_softmax(-1)
    assert out.sampled_token_ids[1] == 7
    assert out.logprob_token_ids[:, 0].tolist() == out.sampled_token_ids.tolist()
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.logprobs[:, 1:], raw.topk(2, dim=-1).values)
    assert out.ranks[1].item() == (raw[1] > raw[1, 7]).sum().item() + 1


def _seeded_tokens(seed: int, position: int, batch: int) -> list[int]:
    """A seeded row at `position` of a step of `batch` rows, for 5 steps over 1000 tokens."""
    logits = torch.randn(batch, 1000, generator=torch.Generator().manual_seed(batch))
    logits[position] = torch.linspace(-1, 1, 1000)
    tokens = []
    for step in range(5):
        generators = {position: torch.Generator().manual_seed(seed * 1000 + step)}
        md = metadata([1.0] * batch, generators=generators, top_p=torch.full((batch,), 0.9))
        tokens.append(Sampler()(logits.clone(), md).sampled_token_ids[position].item())
    return tokens


def test_seeded_rows_are_batch_independent() -> None:
    alone = _seeded_tokens(7, 0, 1)
    assert _seeded_tokens(7, 3, 8) == alone
    assert _seeded_tokens(7, 5, 6) == alone
    assert _seeded_tokens(8, 0, 1) != alone


# ---------------------------------------------------------------- the fused path's routing

def test_reference_sample_gumbel() -> None:
    n = 20000
    temperature = torch.full((n,), 0.7)
    temperature[:50] = 0.0
    seeds = torch.randint(0, 2 ** 63 - 1, (n,))
    logits = LOGITS.expand(n, -1)
    tokens = reference.sample_gumbel(logits, temperature, seeds)
    assert (tokens[:50] == LOGITS.argmax()).all()
    assert samples_match(tokens[50:], (LOGITS / 0.7).softmax(0))
    assert not samples_match(tokens[50:], (LOGITS / 0.75).softmax(0))
    # A row's token is a function of its logits, temperature and seed.
    perm = torch.randperm(200)
    again = reference.sample_gumbel(logits[:200], temperature[perm], seeds[perm])
    assert torch.equal(again, tokens[perm])


def test_fused_path_routes_rows_needing_processors_to_torch() -> None:
    n = 4000
    logits = torch.randn(n, 16)
    temperature = torch.ones(n)
    temperature[::7] = 0.0
    seeds = torch.randint(0, 2 ** 63 - 1, (n,))
    banned = torch.arange(0, n, 5)  # these rows ban their argmax
    torch_rows = torch.zeros(n, dtype=torch.bool)
    torch_rows[banned] = True
    md = metadata(temperature, seeds=seeds, torch_rows=torch_rows, ban_rows=banned,
                  ban_token_ids=logits[banned].argmax(-1), max_num_logprobs=0)
    out = Sampler()(logits.clone(), md)
    sampled = out.sampled_token_ids
    fused = reference.sample_gumbel(logits, temperature, seeds)
    assert torch.equal(sampled[~torch_rows], fused[~torch_rows])
    assert (sampled[banned] != logits[banned].argmax(-1)).all()
    greedy_banned = banned[temperature[banned] == 0]
    second_best = logits[greedy_banned].topk(2, dim=-1).indices[:, 1]
    assert torch.equal(sampled[greedy_banned], second_best)
    torch.testing.assert_close(out.logprobs[:, 0], logits.log_softmax(-1).gather(1, sampled[:, None])[:, 0])
    # Every row fused: no torch path at all.
    md = metadata(temperature, seeds=seeds)
    assert torch.equal(Sampler()(logits.clone(), md).sampled_token_ids, fused)


# ---------------------------------------------------------- the Triton kernel, interpreted

def _case_kernel_greedy_exact() -> None:
    from kernels.triton_sampling import sample_gumbel

    for dtype in (torch.float32, torch.float16):
        for vocab, split, block in ((50, 8192, 1024), (1000, 64, 16), (300, 128, 64)):
            # Few distinct values: ties everywhere, where the first column must win.
            logits = torch.randint(0, 4, (5, vocab)).to(dtype)
            logits[3, vocab - 1] = 9  # the max in the last, partial tile
            logits[4, 0] = 9
            zeros = torch.zeros(5)
            seeds = torch.randint(0, 2 ** 63 - 1, (5,))
            tokens = sample_gumbel(logits, zeros, seeds, split_size=split, block_size=block)
            assert torch.equal(tokens, logits.float().argmax(-1)), (dtype, vocab, tokens)
    # A strided view of a wider tensor, and a stride-0 batch of one row.
    wide = torch.randn(4, 130)
    tokens = sample_gumbel(wide[:, :100], torch.zeros(4), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(tokens, wide[:, :100].argmax(-1))
    row = torch.randn(1, 77)
    tokens = sample_gumbel(row.expand(3, -1), torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    assert (tokens == row.argmax()).all()


def _case_kernel_distribution() -> None:
    from kernels.triton_sampling import sample_gumbel

    n = 600
    seeds = torch.randint(0, 2 ** 63 - 1, (n,))
    tokens = sample_gumbel(LOGITS[None].expand(n, -1), torch.full((n,), 0.5), seeds)
    assert samples_match(tokens, (LOGITS / 0.5).softmax(0)), chi_square_pvalue(tokens, (LOGITS / 0.5).softmax(0))
    assert not samples_match(tokens, LOGITS.softmax(0))  # temperature ignored
    # float16 logits over two splits, 8 columns finite and the rest -inf: still the distribution.
    wide = torch.full((1, 128), float("-inf"))
    wide[0, ::16] = LOGITS
    tokens = sample_gumbel(wide.half().expand(200, -1), torch.full((200,), 1.0), seeds[:200],
                           split_size=64, block_size=64)
    assert (tokens % 16 == 0).all()
    assert samples_match(tokens // 16, LOGITS.half().float().softmax(0))


def _case_kernel_seed_determinism() -> None:
    from kernels.triton_sampling import sample_gumbel

    logits = torch.randn(6, 500)
    temperature = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 0.8])
    seeds = torch.randint(0, 2 ** 63 - 1, (6,))
    tokens = sample_gumbel(logits, temperature, seeds)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    assert torch.equal(sample_gumbel(logits[perm], temperature[perm], seeds[perm]), tokens[perm])
    # Nor on how the kernel tiles the row.
    assert torch.equal(sample_gumbel(logits, temperature, seeds, split_size=128, block_size=32), tokens)
    assert torch.equal(sample_gumbel(logits[2:3], temperature[2:3], seeds[2:3], split_size=64, block_size=16),
                       tokens[2:3])
    # Seeds pick the noise: over 4 rows of near-uniform logits, other seeds give other tokens.
    flat = torch.zeros(4, 500)
    first = sample_gumbel(flat, torch.ones(4), seeds[:4])
    assert not torch.equal(sample_gumbel(flat, torch.ones(4), seeds[:4] + 1), first)
    assert torch.equal(sample_gumbel(flat, torch.ones(4), seeds[:4].clone()), first)


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "kernel_greedy_exact": _case_kernel_greedy_exact,
    "kernel_distribution": _case_kernel_distribution,
    "kernel_seed_determinism": _case_kernel_seed_determinism,
}


interpreter_results, test_triton_kernel = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])


@pytest.mark.parametrize("offset", [0, 1])
def test_seed_keys_are_exact_over_all_of_int64(offset):
    """A seeded row's key is (seed + offset + num_output * _SEED_MIX) mod 2**63, computed in
    uint64 arithmetic for a whole step at once: it must equal the exact integer formula for
    any int64 seed, so that a request's tokens never depend on how its key was computed."""
    rng = random.Random(0)
    seeds = [rng.randrange(-2**63, 2**63) for _ in range(2000)] + [-2**63, -1, 0, 1, 2**63 - 1]
    num_output = [rng.randrange(0, 2**31) for _ in seeds]
    keys = seed_keys(np.array(seeds, dtype=np.int64), np.array(num_output, dtype=np.int64), offset)
    assert keys.tolist() == [(s + offset + n * _SEED_MIX) % 2**63 for s, n in zip(seeds, num_output)]
