"""Rejection sampler tests on the CPU: the torch reference (`kernels.reference.rejection_sample`,
what `kernels.ops.rejection_sample` runs on the CPU) in this process, and the Triton kernel
(`kernels.triton_rejection`) under the interpreter in a subprocess, as in tests/test_sampler.py.

- Distribution preservation: drafts drawn from q (or treated as point masses) over a batch of
  requests with their own seeds; the first emitted token must be distributed as the target p_0,
  and the second, among requests that accepted their first draft, as p_1. Checked by the total
  variation distance of the frequencies, under a bound that a correct sampler exceeds with
  probability below ALPHA (see tv_bound). Deliberately wrong samplers (accepting every draft,
  recovering from p instead of the residual) fail the same check at the same sample sizes.
  An interpreted program costs ~10-40 ms, so the kernel's checks draw a few hundred
  requests (bound ~0.19 against deviations of 0.25 and 0.5); tests/gpu/test_rejection_sampler_gpu.py
  draws ~10^5 at the real vocabulary size.
- Exact behaviour, for both: greedy requests (accepted prefix, argmax at the first mismatch,
  lowest index on ties, bonus when all are accepted), requests without drafts, -1 padding,
  sampled requests whose outcome is certain (p(d) = 1 accepts; p(d) = 0 rejects, and the
  residual, or p when the residual is all zero, has one token), and rows that depend on their
  seed alone: not on the batch, max_num_draft, or the kernel's split and block sizes.
Draws come from seeded generators: the tests are deterministic.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import pytest
import torch

from kernels import ops, reference
from triton_interpreter import interpreter_tests, run_cases

ALPHA = 1e-4  # a correct sampler fails a distribution check this rarely
N_REFERENCE = 20000
N_KERNEL = 300  # with 2 drafts each
N_KERNEL_POINT_MASS = 200  # with 1 draft each
# Position j's target (P[j]) and draft (Q[j]) distributions. At position 0 the draft covers
# the target's two first tokens and then some, so half the drafts are accepted and the other
# half must recover from the residual p_0 - q_0 on tokens 2..5: recovering from p_0 instead,
# or accepting everything, is far from p_0 (total variation 0.25 and 0.5).
P = torch.tensor([[0.25, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0],
                  [0.05, 0.1, 0.15, 0.2, 0.25, 0.25, 0.0, 0.0]])
Q = torch.tensor([[0.4, 0.3, 0.0, 0.0, 0.0, 0.0, 0.2, 0.1],
                  [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]])
BONUS = 7  # p is 0 there: a bonus token in the first or second place would show
Sample = Callable[..., torch.Tensor]  # rejection_sample's signature


def tv_distance(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    freq = torch.bincount(tokens, minlength=len(probs)).double() / len(tokens)
    return 0.5 * (freq - probs.double()).abs().sum().item()


def tv_bound(probs: torch.Tensor, n: int) -> float:
    """A bound on the total variation distance between the frequencies of n independent draws
    from `probs` and `probs`, exceeded with probability below ALPHA: its mean is at most
    sum(sqrt(p (1 - p) / n)) / 2 (Jensen), and one draw moves it by at most 1 / n, so it exceeds
    its mean by t with probability at most exp(-2 n t^2) (McDiarmid)."""
    probs = probs.double()
    mean = 0.5 * (probs * (1 - probs)).sqrt().sum().item() / math.sqrt(n)
    return mean + math.sqrt(math.log(1 / ALPHA) / (2 * n))


def distributed_as(tokens: torch.Tensor, probs: torch.Tensor) -> bool:
    return tv_distance(tokens, probs) < tv_bound(probs, len(tokens))


def request(drafts: list[int], p: torch.Tensor, q: torch.Tensor | None = None, bonus: int = BONUS,
            greedy: bool = False, seed: int = 0) -> dict:
    """One request: its drafts, target rows p [k, V], draft rows q [k, V] (None: point masses)."""
    return dict(drafts=drafts, p=p, q=q, bonus=bonus, greedy=greedy, seed=seed)


def run(sample: Sample, requests: list[dict], max_num_draft: int | None = None, **kwargs) -> torch.Tensor:
    """Sample a batch of requests (all with draft rows, or all without)."""
    counts = [len(r["drafts"]) for r in requests]
    vocab = next(r["p"].shape[1] for r in requests if len(r["drafts"]))
    with_q = requests[0]["q"] is not None

    def cat(key: str) -> torch.Tensor:
        return torch.cat([r[key].reshape(-1, vocab) for r in requests])

    return sample(torch.tensor([d for r in requests for d in r["drafts"]], dtype=torch.int64),
                  torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                  cat("p"), cat("q") if with_q else None,
                  torch.tensor([r["bonus"] for r in requests], dtype=torch.int64),
                  torch.tensor([r["greedy"] for r in requests]),
                  torch.tensor([r["seed"] for r in requests], dtype=torch.int64),
                  max(counts) if max_num_draft is None else max_num_draft, **kwargs)


def spec_batch(n: int, k: int, with_draft_probs: bool) -> tuple[tuple, torch.Tensor]:
    """The statistical batch: n requests of k drafts (k <= 2) drawn from Q, each with its own
    seed; returns rejection_sample's arguments and the drafts [n, k]."""
    gen = torch.Generator().manual_seed(n)
    drafts = torch.stack([torch.multinomial(Q[j], n, replacement=True, generator=gen) for j in range(k)], dim=1)
    args = (drafts.flatten(), torch.arange(0, k * n + 1, k, dtype=torch.int32), P[:k].repeat(n, 1),
            Q[:k].repeat(n, 1) if with_draft_probs else None, torch.full((n,), BONUS),
            torch.zeros(n, dtype=torch.bool), torch.randint(0, 2 ** 63 - 1, (n,), generator=gen), k)
    return args, drafts


def check_distribution(sample: Sample, n: int, k: int, with_draft_probs: bool) -> torch.Tensor:
    """Returns the first tokens."""
    out = sample(*spec_batch(n, k, with_draft_probs)[0])
    first, accepted_first = out[:, 0], out[:, 1] >= 0
    assert (P[0][first] > 0).all()
    assert distributed_as(first, P[0]), (tv_distance(first, P[0]), tv_bound(P[0], n))
    if k == 2:
        second = out[accepted_first, 1]
        assert (P[1][second] > 0).all()
        assert distributed_as(second, P[1]), (tv_distance(second, P[1]), tv_bound(P[1], len(second)))
    # Rejecting every draft and sampling p would pass the above: the acceptance rate must be
    # sum_d q(d) min(1, p(d) / q(d)), within Hoeffding's bound.
    rate = torch.minimum(P[0], Q[0]).sum() if with_draft_probs else (P[0] * Q[0]).sum()
    assert abs(accepted_first.double().mean().item() - rate.item()) < math.sqrt(math.log(2 / ALPHA) / (2 * n))
    return first


# Deliberately wrong samplers of the first token, on the statistical batch.

def accept_always(drafts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return drafts[:, 0]


def recover_from_target(drafts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    d = drafts[:, 0]
    accepted = torch.rand(len(d), generator=gen) * Q[0][d] <= P[0][d]
    return torch.where(accepted, d, torch.multinomial(P[0], len(d), replacement=True, generator=gen))


# ------------------------------------------------------------------ exact checks, both samplers

K = 4  # max_num_draft of the exact checks


def one_hot(token: int, vocab: int = 16) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).float()


def check_greedy(sample: Sample, vocab: int = 50, **kwargs) -> None:
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.randint(0, 5, (4, vocab), generator=gen).float()  # few values: ties everywhere
    probs[3, vocab - 1] = 9  # the max in the last column
    argmax = probs.argmax(-1).tolist()
    tied = probs[0].eq(probs[0].max()).nonzero().flatten().tolist()
    assert len(tied) > 1 and tied[0] == argmax[0]
    reqs = [request(argmax[:3], probs[:3], greedy=True, bonus=11),  # all accepted: the bonus
            request([argmax[0], (argmax[1] + 1) % vocab, argmax[2]], probs[:3], greedy=True),  # mismatch at 1
            request([tied[-1]], probs[:1], greedy=True),  # a tied max that is not the first: rejected
            request([], probs[:0], greedy=True, bonus=5),
            request(argmax, probs, greedy=True, bonus=12)]
    out = run(sample, reqs, K, **kwargs)
    expected = [argmax[:3] + [11, -1], [argmax[0], argmax[1], -1, -1, -1], [argmax[0], -1, -1, -1, -1],
                [5, -1, -1, -1, -1], argmax + [12]]
    assert out.tolist() == expected, (out, expected)


def check_certain_outcomes(sample: Sample, **kwargs) -> None:
    """Sampled requests whose acceptance and recovered token do not depend on the draw."""
    v = 16
    for with_q in (False, True):
        def q(*rows: torch.Tensor) -> torch.Tensor | None:
            return torch.stack(rows).reshape(-1, v) if with_q else None

        reqs = [request([3, 4], torch.stack([one_hot(3), one_hot(4)]), q(one_hot(3), one_hot(4)), bonus=9),
                request([3, 4], torch.stack([one_hot(3), one_hot(6)]), q(one_hot(3), one_hot(4))),  # p(4) = 0
                request([], torch.zeros(0, v), q(torch.zeros(0, v)), bonus=2),
                request([5], one_hot(8)[None], q(one_hot(5)))]
        expected = [[3, 4, 9, -1], [3, 6, -1, -1], [2, -1, -1, -1], [8, -1, -1, -1]]
        if with_q:
            # p(d) = 0 rejects, p - q has no positive entry: the token comes from p.
            reqs.append(request([0], one_hot(1)[None], torch.ones(1, v)))
            expected.append([1, -1, -1, -1])
        assert run(sample, reqs, 3, **kwargs).tolist() == expected, with_q


def random_requests(greedy_every: int, with_q: bool, vocab: int = 40) -> list[dict]:
    """Requests of 0 to K drafts over random distributions, each its own seed."""
    gen = torch.Generator().manual_seed(vocab)
    reqs = []
    for i in range(12):
        k = i % (K + 1)
        p = torch.rand(k, vocab, generator=gen) ** 8
        p /= p.sum(-1, keepdim=True)
        q = torch.rand(k, vocab, generator=gen) ** 8 + p
        q = q / q.sum(-1, keepdim=True) if with_q else None
        # Mostly the argmax, so that greedy requests accept some drafts too.
        guess = torch.rand(k, generator=gen) < 0.7
        drafts = torch.where(guess, p.argmax(-1), torch.randint(0, vocab, (k,), generator=gen)).tolist()
        reqs.append(request(drafts, p, q, bonus=i, greedy=i % greedy_every == 0, seed=1000 + i))
    return reqs


def check_rows_depend_on_seed_alone(sample: Sample, **rerun_kwargs) -> None:
    """Reruns (with rerun_kwargs: the kernel's tiling) give the same rows for the same seeds."""
    for with_q in (False, True):
        reqs = random_requests(greedy_every=4, with_q=with_q)
        out = run(sample, reqs, K)
        perm = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(1)).tolist()
        assert torch.equal(run(sample, [reqs[i] for i in perm], K, **rerun_kwargs), out[perm])
        alone = run(sample, reqs[7:8], K + 2, **rerun_kwargs)[0]
        assert alone.tolist() == out[7].tolist() + [-1, -1]
        reseeded = [dict(r, seed=r["seed"] + 1) for r in reqs]
        assert not torch.equal(run(sample, reseeded, K, **rerun_kwargs), out)


# ------------------------------------------------------------------------------ the reference

def test_tv_check_tells_right_from_wrong() -> None:
    for n in (N_REFERENCE, N_KERNEL):
        gen = torch.Generator().manual_seed(n)
        assert distributed_as(torch.multinomial(P[0], n, replacement=True, generator=gen), P[0])
        drafts = spec_batch(n, 1, with_draft_probs=True)[1]
        for wrong in (accept_always, recover_from_target):
            tokens = wrong(drafts, gen)
            assert not distributed_as(tokens, P[0]), (wrong.__name__, n, tv_distance(tokens, P[0]))


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_reference_preserves_the_target_distribution(with_draft_probs: bool) -> None:
    check_distribution(reference.rejection_sample, N_REFERENCE, 2, with_draft_probs)


def test_reference_greedy() -> None:
    check_greedy(reference.rejection_sample)


def test_reference_certain_outcomes() -> None:
    check_certain_outcomes(reference.rejection_sample)


def test_reference_rows_depend_on_seed_alone() -> None:
    check_rows_depend_on_seed_alone(reference.rejection_sample)


def test_ops_runs_the_reference_on_cpu_and_checks_shapes() -> None:
    args, _ = spec_batch(50, 2, with_draft_probs=True)
    assert torch.equal(ops.rejection_sample(*args), reference.rejection_sample(*args))
    drafts, cu, target, draft, bonus, greedy, seeds, k = args
    with pytest.raises(ValueError, match=r"cu_num_draft has shape \(50,\), expected \(51,\)"):
        ops.rejection_sample(drafts, cu[1:], target, draft, bonus, greedy, seeds, k)
    with pytest.raises(ValueError, match=r"draft_probs has shape \(100, 7\), expected \(100, 8\)"):
        ops.rejection_sample(drafts, cu, target, draft[:, 1:], bonus, greedy, seeds, k)
    with pytest.raises(ValueError, match="request 0 has 2 drafts, more than max_num_draft=1"):
        ops.rejection_sample(drafts, cu, target, draft, bonus, greedy, seeds, 1)


# ---------------------------------------------------------- the Triton kernel, interpreted

def _triton() -> Sample:
    from kernels.triton_rejection import rejection_sample
    return rejection_sample


def _case_kernel_distribution() -> None:
    first = check_distribution(_triton(), N_KERNEL, 2, with_draft_probs=True)
    # The check has the power to tell the kernel's tokens from what wrong samplers would give.
    overlap = torch.minimum(P[0], Q[0])
    assert not distributed_as(first, overlap + (1 - overlap.sum()) * P[0])  # recovering from p
    assert not distributed_as(first, Q[0])  # accepting every draft


def _case_kernel_distribution_point_mass() -> None:
    check_distribution(_triton(), N_KERNEL_POINT_MASS, 1, with_draft_probs=False)


def _case_kernel_exact() -> None:
    check_greedy(_triton())
    # Several splits (a tie across them, the max in the last, partial tile) and tiles.
    check_greedy(_triton(), vocab=300, split_size=64, block_size=16)
    check_certain_outcomes(_triton())
    check_certain_outcomes(_triton(), split_size=32, block_size=16)
    # Greedy requests as the reference, exactly.
    reqs = random_requests(greedy_every=1, with_q=True, vocab=100)
    assert torch.equal(run(_triton(), reqs, K, split_size=64, block_size=32), run(reference.rejection_sample, reqs, K))


def _case_kernel_rows_depend_on_seed_alone() -> None:
    check_rows_depend_on_seed_alone(_triton(), split_size=16, block_size=16)  # 3 splits instead of 1


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "kernel_distribution": _case_kernel_distribution,
    "kernel_distribution_point_mass": _case_kernel_distribution_point_mass,
    "kernel_exact": _case_kernel_exact,
    "kernel_rows_depend_on_seed_alone": _case_kernel_rows_depend_on_seed_alone,
}


interpreter_results, test_triton_kernel = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])
