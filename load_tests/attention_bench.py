"""Paged attention (the Triton kernel) at the Qwen3-0.6B head shape, against the roofline:
decode batches of 4 to 256 requests and two prefills, each with the configuration the kernel
picks and a few forced ones, and torch's dense SDPA for comparison.

    python -m load_tests.attention_bench
    python -m load_tests.attention_bench --output attention.txt   # also write the table there

A decode row's floor is its KV bytes (plus the query and output) at the copy bandwidth; a
prefill row's is its causal FLOPs at the bf16 matmul rate; both ceilings are measured in the
same run (load_tests.throughput.measure_device). Times are `triton.testing.do_bench` medians.
Correctness of the same kernel is tests/gpu/test_kernels_gpu.py.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from load_tests.gpu_inputs import QWEN3_HEADS, AttentionBatch, make_attention_batch
from load_tests.throughput import measure_device


def _seconds(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3


def bench(heads: tuple[int, int, int], kv_dtype: torch.dtype) -> list[str]:
    """Prints each row as it is measured; returns the table."""
    from kernels.triton_attention import AttentionConfig, paged_attention_with_config, select_config

    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = heads
    bandwidth, matmul_flops = measure_device()
    torch.cuda.empty_cache()
    rows = [f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s (read + write), "
            f"bf16 matmul {matmul_flops / 1e12:.0f} TFLOP/s; heads {heads}, KV cache {kv_dtype}"]
    print(rows[0], flush=True)

    def report(name: str, seconds: float, nbytes: float = 0.0, flops: float = 0.0) -> None:
        floor = max(nbytes / bandwidth, flops / matmul_flops)
        row = f"{name:<72} {seconds * 1e6:9.1f} us  floor {floor * 1e6:8.1f} us  {floor / seconds:6.1%}"
        if nbytes:
            row += f"  {nbytes / seconds / 1e12:5.2f} TB/s"
        if flops:
            row += f"  {flops / seconds / 1e12:6.1f} TFLOP/s"
        rows.append(row)
        print(row, flush=True)

    def kv_bytes(batch: AttentionBatch) -> float:
        tokens = batch.seq_lens.sum().item()
        return (2 * tokens * num_kv_heads * head_dim * batch.kv_cache.element_size()
                + 2 * batch.query.numel() * batch.query.element_size())

    # (name, context lengths, configurations to compare with the automatic one)
    decode_cases = [
        ("decode B=256 ctx=1024", [1023] * 256,
         [AttentionConfig(16, 64, 1, 4, 3), AttentionConfig(16, 128, 1, 4, 2),
          AttentionConfig(16, 128, 1, 4, 3), AttentionConfig(16, 64, 1, 4, 4), AttentionConfig(16, 128, 1, 8, 3),
          AttentionConfig(16, 256, 1, 8, 2)]),
        ("decode B=256 ctx~U[100,2048]", [random.Random(0).randint(99, 2047) for _ in range(256)], []),
        ("decode B=64 ctx=1024", [1023] * 64, []),
        ("decode B=32 ctx=1024", [1023] * 32, [AttentionConfig(16, 64, s, 4, 2) for s in (1, 2, 4)]),
        ("decode B=16 ctx=1024", [1023] * 16, []),
        ("decode B=4 ctx=4096", [4095] * 4, []),
    ]
    for name, context_lens, configs in decode_cases:
        batch = make_attention_batch([1] * len(context_lens), context_lens, *heads, 16,
                                     torch.bfloat16, poison=False)
        batch.kv_cache = batch.kv_cache.to(kv_dtype)
        nbytes = kv_bytes(batch)
        auto = select_config(len(context_lens), len(context_lens), num_heads // num_kv_heads,
                             batch.block_tables.shape[1] * 16, num_kv_heads, batch.query.device,
                             fp8_cache=kv_dtype == torch.float8_e4m3fn)
        order = torch.argsort(batch.seq_lens, descending=True)  # as the CUDA graphs start them
        for config in (auto, *configs):
            seconds = _seconds(lambda: paged_attention_with_config(*batch.args(), 0.088, config, order))
            label = "auto" if config is auto else "    "
            report(f"{name} {label} m/n/splits/warps/stages {config.block_m}/{config.block_n}/"
                   f"{config.num_splits}/{config.num_warps}/{config.num_stages}", seconds, nbytes=nbytes)
        del batch

    # Prefill: causal FLOPs = 4 * D * H * sum over prompts of (new tokens x keys seen on average).
    prefill_cases = [
        ("prefill 8x1024 from scratch", [1024] * 8, [0] * 8,
         [AttentionConfig(128, 64, 1, 4, 3), AttentionConfig(128, 128, 1, 8, 2)]),
        ("prefill 4x512 chunk over 2048 cached", [512] * 4, [2048] * 4, []),
    ]
    for name, query_lens, context_lens, configs in prefill_cases:
        batch = make_attention_batch(query_lens, context_lens, *heads, 16, torch.bfloat16, poison=False)
        batch.kv_cache = batch.kv_cache.to(kv_dtype)
        flops = 4 * head_dim * num_heads * sum(q * (c + (q + 1) / 2) for q, c in zip(query_lens, context_lens))
        auto = select_config(sum(query_lens), len(query_lens), num_heads // num_kv_heads,
                             batch.block_tables.shape[1] * 16, num_kv_heads, batch.query.device)
        for config in (auto, *configs):
            seconds = _seconds(lambda: paged_attention_with_config(*batch.args(), 0.088, config))
            label = "auto" if config is auto else "    "
            report(f"{name} {label} m/n/warps/stages {config.block_m}/{config.block_n}/"
                   f"{config.num_warps}/{config.num_stages}", seconds, flops=flops)
        del batch
    q = torch.randn(8, num_heads, 1024, head_dim, device="cuda").bfloat16()
    k = torch.randn(8, num_kv_heads, 1024, head_dim, device="cuda").bfloat16()
    v = torch.randn_like(k)
    flops = 4 * head_dim * num_heads * 8 * 1024 * 1025 / 2
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    report("torch SDPA dense causal 8x1024 (comparison)", _seconds(sdpa), flops=flops)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="also write the table to this file")
    parser.add_argument("--heads", type=int, nargs=3, default=QWEN3_HEADS, metavar=("Q", "KV", "DIM"),
                        help="query heads, KV heads, head dim (default: Qwen3-0.6B's; Llama-3.1-8B: 32 8 128)")
    parser.add_argument("--kv-cache-dtype", choices=["bfloat16", "fp8"], default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs a CUDA GPU")
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    table = "\n".join(bench(tuple(args.heads), kv_dtype))
    print("\n" + table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
