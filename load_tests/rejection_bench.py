"""The rejection sampler's Triton kernel (speculative decoding's verification) at the Qwen3
vocabulary (151,936), float32 probabilities, 4 drafts per request, batch 1 to 256, then the
kernel's configurations.

    python -m load_tests.rejection_bench

"GPU µs" is the median of a CUDA graph replay (the device's time alone); "eager µs" is the
wall time per call back to back, the host's launch work included. Correctness is
tests/gpu/test_rejection_sampler_gpu.py.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from load_tests.gpu_inputs import VOCAB, random_seeds

DRAFTS = 4


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

    k = DRAFTS
    print(f"{torch.cuda.get_device_name()}; vocab {VOCAB}, float32 probs, {k} drafts per request. GPU: median µs "
          "of a CUDA graph replay; eager: µs per call back to back, host launch work included")
    print(f"{'batch':>5} {'mode':<28} {'rows read':>10} {'GPU µs':>8} {'GB/s':>6} {'eager µs':>9}")
    for batch in (1, 8, 64, 256):
        torch.manual_seed(0)
        total = batch * k
        target = (torch.randn(total, VOCAB, device="cuda") * 3).softmax(-1)
        draft = (target.log() + torch.randn(total, VOCAB, device="cuda")).softmax(-1)
        cu = torch.arange(0, total + 1, k, dtype=torch.int32, device="cuda")
        bonus = torch.zeros(batch, dtype=torch.int64, device="cuda")
        seeds = random_seeds(batch)
        greedy = torch.ones(batch, dtype=torch.bool, device="cuda")
        sampled = torch.zeros(batch, dtype=torch.bool, device="cuda")
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
        target = (torch.randn(total, VOCAB, device="cuda") * 3).softmax(-1)
        cu = torch.arange(0, total + 1, k, dtype=torch.int32, device="cuda")
        bonus = torch.zeros(batch, dtype=torch.int64, device="cuda")
        for name, drafts, greedy in (("greedy", target.argmax(-1), True), ("p(d)~0", target.argmin(-1), False)):
            is_greedy = torch.full((batch,), greedy, device="cuda")
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


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("rejection_bench needs a CUDA GPU")
    bench()


if __name__ == "__main__":
    main()
