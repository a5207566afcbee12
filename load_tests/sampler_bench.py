"""The fused sampling kernel against the torch path it replaced, at the Qwen3 vocabulary
(151,936) with bf16 logits, batch 1 to 256, then the kernel's configurations.

    python -m load_tests.sampler_bench

Columns: the old path (the worker's `Sampler` on logits cast to float32, torch ops), the new
one (the same `Sampler` on bf16 logits with per-request seeds: the fused kernel), and the
kernel alone; median GPU ms of `triton.testing.do_bench`. The sampler is a worker's, so this
benchmark imports `workers.sampler`. Correctness is tests/gpu/test_sampler_gpu.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from load_tests.gpu_inputs import VOCAB, random_seeds, sampling_metadata


def bench() -> None:
    from triton.testing import do_bench

    from kernels.triton_sampling import sample_gumbel
    from workers.sampler import Sampler

    print(f"{torch.cuda.get_device_name()}; vocab {VOCAB}, bf16 logits; median GPU ms (do_bench)")
    print(f"{'batch':>5} {'mode':<8} {'old: .float()+torch':>20} {'new: sampler':>13} {'kernel':>8} {'speed-up':>9}")
    sampler = Sampler()
    for batch in (1, 16, 64, 256):
        torch.manual_seed(0)
        logits = (torch.randn(batch, VOCAB, device="cuda") * 3).to(torch.bfloat16)
        seeds = random_seeds(batch)
        for mode, temp in (("T=0.6", 0.6), ("greedy", 0.0)):
            temperature = torch.full((batch,), temp, device="cuda")
            old_md, new_md = sampling_metadata(temperature), sampling_metadata(temperature, seeds=seeds)
            old = do_bench(lambda: sampler(logits.float(), old_md), return_mode="median")
            new = do_bench(lambda: sampler(logits, new_md), return_mode="median")
            kernel = do_bench(lambda: sample_gumbel(logits, temperature, seeds), return_mode="median")
            print(f"{batch:>5} {mode:<8} {old:>20.4f} {new:>13.4f} {kernel:>8.4f} {old / new:>8.1f}x")

    print("\nkernel configurations (T=0.6), median ms:")
    for batch in (1, 256):
        logits = (torch.randn(batch, VOCAB, device="cuda") * 3).to(torch.bfloat16)
        temperature = torch.full((batch,), 0.6, device="cuda")
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


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("sampler_bench needs a CUDA GPU")
    bench()


if __name__ == "__main__":
    main()
