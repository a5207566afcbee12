"""The rejection sampler's Triton kernel on a CUDA GPU at the real vocabulary size (skipped
without one).

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_rejection_sampler_gpu.py -q
    PYTHONPATH=$PWD python tests/gpu/test_rejection_sampler_gpu.py --bench   # µs per call

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

import argparse
import math
import sys
import time

import pytest
import torch

from kernels import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 151936  # Qwen3
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


def random_seeds(n: int) -> torch.Tensor:
    return torch.randint(0, 2 ** 63 - 1, (n,), device=DEVICE)


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


# ------------------------------------------------------------------------------------- bench

def graph_us(fn) -> float:
    """Median µs of a CUDA graph replay of fn: the GPU's time alone."""
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()  # do_bench_cudagraph runs on a stream of its own: the inputs must be ready
    return do_bench_cudagraph(fn, return_mode="median") * 1000


def eager_us(fn, iters: int = 200) -> float:
    """Wall-clock µs per call, back to back: the GPU time or the host's launch work, whichever is more."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def bench() -> None:
    from kernels.triton_rejection import rejection_sample

    k = 4
    print(f"{torch.cuda.get_device_name()}; vocab {VOCAB}, float32 probs, {k} drafts per request. GPU: median µs "
          "of a CUDA graph replay; eager: µs per call back to back, host launch work included")
    print(f"{'batch':>5} {'mode':<28} {'rows read':>10} {'GPU µs':>8} {'GB/s':>6} {'eager µs':>9}")
    for batch in (1, 8, 64, 256):
        torch.manual_seed(0)
        total = batch * k
        target = (torch.randn(total, VOCAB, device=DEVICE) * 3).softmax(-1)
        draft = (target.log() + torch.randn(total, VOCAB, device=DEVICE)).softmax(-1)
        cu = torch.arange(0, total + 1, k, dtype=torch.int32, device=DEVICE)
        bonus = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
        seeds = random_seeds(batch)
        greedy, sampled = torch.ones(batch, dtype=torch.bool, device=DEVICE), torch.zeros(batch, dtype=torch.bool,
                                                                                          device=DEVICE)
        drafted = torch.multinomial(draft, 1)[:, 0]
        modes = (("greedy, all accepted", target.argmax(-1), None, greedy),
                 ("sampled, draft probs", drafted, draft, sampled), ("sampled, point mass", drafted, None, sampled),
                 ("sampled, point mass, p(d)~0", target.argmin(-1), None, sampled))
        for name, drafts, draft_probs, is_greedy in modes:
            args = (drafts, cu, target, draft_probs, bonus, is_greedy, seeds, k)
            # Full rows read: a greedy request's every position, a sampled one's first rejected.
            rows = total if is_greedy.all() else int(((rejection_sample(*args) >= 0).sum(1) <= k).sum())
            gpu = graph_us(lambda: rejection_sample(*args))
            row_bytes = VOCAB * 4 * (1 if draft_probs is None else 2)
            print(f"{batch:>5} {name:<28} {rows:>10} {gpu:>8.1f} {rows * row_bytes / gpu / 1000:>6.0f} "
                  f"{eager_us(lambda: rejection_sample(*args)):>9.1f}")

    print("\nkernel configurations, GPU µs (CUDA graph):")
    for batch in (1, 256):
        total = batch * k
        target = (torch.randn(total, VOCAB, device=DEVICE) * 3).softmax(-1)
        cu = torch.arange(0, total + 1, k, dtype=torch.int32, device=DEVICE)
        bonus = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
        for name, drafts, greedy in (("greedy", target.argmax(-1), True), ("p(d)~0", target.argmin(-1), False)):
            is_greedy = torch.full((batch,), greedy, device=DEVICE)
            args = (drafts, cu, target, None, bonus, is_greedy, random_seeds(batch), k)
            results = []
            for split in (4096, 8192, 16384):
                for block in (512, 1024, 2048):
                    for warps in (2, 4, 8):
                        us = graph_us(lambda: rejection_sample(*args, split_size=split, block_size=block,
                                                               num_warps=warps))
                        results.append((round(us, 1), split, block, warps))
            results.sort()
            print(f"batch {batch} {name}: best (µs, split, block, warps) {results[:4]}, worst {results[-1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true")
    if parser.parse_args().bench:
        bench()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
