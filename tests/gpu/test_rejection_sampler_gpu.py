"""The rejection sampler's Triton kernel on a CUDA GPU at the real vocabulary size (skipped
without one).

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_rejection_sampler_gpu.py -q

Its timings are `python -m load_tests.rejection_bench`.

- Sampled requests preserve the target: 2^17 requests of 2 drafts drawn from q over 151936
  tokens (one target row p and one draft row q shared by every position: stride-0 views), each
  request its own seed. Tokens are pooled into 32 buckets of about equal probability under p
  (in order of probability, so the tail has its buckets too); the first emitted token, and the
  second among requests that accepted their first draft, must be within the total variation
  bound of tests/test_rejection_sampler.py of p, and the same first tokens must fail against
  what recovering from p instead of the residual, or accepting every draft, would give. The
  acceptance rate, and that of the second draft given the first, must be sum min(p, q).
- Greedy requests are exactly the reference's (ties across splits, a max in the last column).
- A request's row depends on its seed alone: not on the batch, nor the kernel's tiling.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import ops, reference
from load_tests.gpu_inputs import VOCAB, random_seeds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ALPHA = 1e-4
DEVICE = "cuda"


def tv_distance(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    freq = torch.bincount(tokens, minlength=len(probs)).double() / len(tokens)
    return 0.5 * (freq - probs.double()).abs().sum().item()


def tv_bound(probs: torch.Tensor, n: int) -> float:
    """Exceeded by the frequencies of n draws from probs with probability below ALPHA (as in
    tests/test_rejection_sampler.py: Jensen for the mean, McDiarmid for the deviation)."""
    probs = probs.double()
    return 0.5 * (probs * (1 - probs)).sqrt().sum().item() / math.sqrt(n) + math.sqrt(math.log(1 / ALPHA) / (2 * n))


class Buckets:
    """32 buckets of about 1/32 of p's mass each, filled in decreasing order of probability."""

    def __init__(self, p: torch.Tensor, num_buckets: int = 32) -> None:
        order = p.argsort(descending=True)
        sorted_p = p[order]
        bucket = ((sorted_p.cumsum(0) - sorted_p) * num_buckets).long().clamp(max=num_buckets - 1)
        self.of = torch.empty_like(order)
        self.of[order] = bucket
        self.num_buckets = num_buckets

    def probs(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_buckets, dtype=torch.float64, device=probs.device).index_add(0, self.of,
                                                                                              probs.double())

    def distributed_as(self, tokens: torch.Tensor, probs: torch.Tensor) -> bool:
        bucket_probs = self.probs(probs)
        return tv_distance(self.of[tokens], bucket_probs) < tv_bound(bucket_probs, len(tokens))


def target_and_draft() -> tuple[torch.Tensor, torch.Tensor]:
    """A realistic spread target and a draft that overlaps about half of it."""
    logits = torch.randn(VOCAB, device=DEVICE, dtype=torch.float64) * 2.5
    draft_logits = logits + torch.randn(VOCAB, device=DEVICE, dtype=torch.float64) * 2.5
    return logits.softmax(0).float(), draft_logits.softmax(0).float()


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_sampled_requests_preserve_the_target(with_draft_probs: bool) -> None:
    from kernels.triton_rejection import rejection_sample

    torch.manual_seed(0)
    n, k = 1 << 17, 2
    p, q = target_and_draft()
    drafts = torch.multinomial(q, n * k, replacement=True)
    out = rejection_sample(drafts, torch.arange(0, n * k + 1, k, dtype=torch.int32, device=DEVICE),
                           p.expand(n * k, -1), q.expand(n * k, -1) if with_draft_probs else None,
                           torch.zeros(n, dtype=torch.int64, device=DEVICE), torch.zeros(n, dtype=torch.bool,
                                                                                         device=DEVICE),
                           random_seeds(n), k)
    buckets = Buckets(p.double())
    first, accepted = out[:, 0], out[:, 1:] >= 0
    assert ((first >= 0) & (first < VOCAB)).all()
    assert buckets.distributed_as(first, p)
    assert buckets.distributed_as(out[accepted[:, 0], 1], p)
    rate = (torch.minimum(p, q) if with_draft_probs else p * q).double().sum().item()
    hoeffding = math.sqrt(math.log(2 / ALPHA) / (2 * n))
    assert abs(accepted[:, 0].double().mean().item() - rate) < hoeffding
    # The second draft's uniform is not the first's: its acceptance is independent.
    second_rate = accepted[:, 1].double().sum().item() / accepted[:, 0].sum().item()
    assert abs(second_rate - rate) < hoeffding / math.sqrt(rate)
    if with_draft_probs:
        overlap = torch.minimum(p, q).double()
        assert not buckets.distributed_as(first, overlap + (1 - overlap.sum()) * p.double())  # recovering from p
        assert not buckets.distributed_as(first, q)  # accepting every draft


def greedy_batch(num_reqs: int, k: int, with_draft_probs: bool) -> tuple:
    """Requests of 0..k drafts over distinct random rows, every third one sampled; drafts are
    mostly each row's argmax. Rows tie their max across splits, and one has it in the last column."""
    counts = torch.arange(num_reqs) % (k + 1)
    total = int(counts.sum())
    target = (torch.randn(total, VOCAB, device=DEVICE) * 3).softmax(-1)
    draft = (torch.randn(total, VOCAB, device=DEVICE) * 3).softmax(-1) if with_draft_probs else None
    guess = torch.rand(total, device=DEVICE) < 0.8
    drafts = torch.where(guess, target.argmax(-1), torch.randint(0, VOCAB, (total,), device=DEVICE))
    for r in range(0, total, 5):
        first, second = sorted(torch.randperm(VOCAB)[:2].tolist())
        target[r, first] = target[r, second] = 0.5
        drafts[r] = second if r % 10 else first  # the second of two tied maxima is rejected
    target[7, -1] = 1.0
    cu = torch.cat((torch.zeros(1, dtype=torch.int32), counts.cumsum(0).int())).to(DEVICE)
    return (drafts, cu, target, draft, torch.randint(0, VOCAB, (num_reqs,), device=DEVICE),
            torch.arange(num_reqs, device=DEVICE) % 3 != 0, random_seeds(num_reqs), k)


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_greedy_requests_match_the_reference(with_draft_probs: bool) -> None:
    from kernels.triton_rejection import rejection_sample

    torch.manual_seed(0)
    args = greedy_batch(96, 4, with_draft_probs)
    greedy = args[5]
    out = rejection_sample(*args)
    assert torch.equal(out[greedy], reference.rejection_sample(*args)[greedy])
    assert torch.equal(ops.rejection_sample(*args), out)
    emitted = (out >= 0).sum(1)
    counts = (args[1][1:] - args[1][:-1]).long()
    assert ((emitted >= 1) & (emitted <= counts + 1)).all()
    assert (out >= 0).long().diff(dim=1).le(0).all()  # tokens, then only padding


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_rows_depend_on_seed_alone(with_draft_probs: bool) -> None:
    from kernels.triton_rejection import rejection_sample

    torch.manual_seed(0)
    drafts, cu, target, draft, bonus, greedy, seeds, k = greedy_batch(256, 4, with_draft_probs)
    # Sampled requests with random drafts: mostly rejected, so the rows depend on the seeds.
    greedy, drafts = torch.zeros_like(greedy), torch.randint_like(drafts, VOCAB)
    out = rejection_sample(drafts, cu, target, draft, bonus, greedy, seeds, k)
    assert torch.equal(rejection_sample(drafts, cu, target, draft, bonus, greedy, seeds, k,
                                        split_size=4096, block_size=512), out)
    for r in (3, 254):  # alone, with a larger max_num_draft
        rows = slice(int(cu[r]), int(cu[r + 1]))
        alone = rejection_sample(drafts[rows], cu[r:r + 2] - cu[r], target[rows],
                                 None if draft is None else draft[rows], bonus[r:r + 1], greedy[r:r + 1],
                                 seeds[r:r + 1], k + 3)
        assert alone[0].tolist() == out[r].tolist() + [-1] * 3
    other = rejection_sample(drafts, cu, target, draft, bonus, greedy, seeds + 1, k)
    assert (other != out).any(1).float().mean() > 0.5
