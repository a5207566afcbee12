"""Quantization speed, side by side in one run: the decode-step microbenchmark
(load_tests.decode_bench's steady-state `EngineCore.step`) at several batch sizes and the
reference workload (load_tests.throughput's), for bf16, FP8 weights (--quantization fp8), an
FP8 KV cache (--kv-cache-dtype fp8) and 4-bit weights (an AWQ checkpoint: the W4A16 kernel),
on random weights (--load-format dummy, a config.json alone).

    python -m load_tests.quant_bench                     # Qwen3-0.6B and Llama-3.1-8B shapes, H200: < 5 min
    python -m load_tests.quant_bench --tiny              # CPU, a tiny shape: checks the script runs
    python -m load_tests.quant_bench --gemm              # also the bare GEMMs: bf16, FP8 (cuBLAS), W4A16

Targets (issue 19): FP8 weights >= 1.6x bf16 at batch 1 on the 8B shape; FP8 KV >= 1.3x bf16 at
batch 256 with 1,024-token contexts; W4A16 >= 2.5x bf16 at batch 1 on the 8B shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from load_tests.decode_bench import max_tokens, octavo_step_seconds
from load_tests.shapes import shape_config
from load_tests.throughput import reference_workload

# name -> LLM keyword arguments (beyond the shared ones) and the checkpoint's quantization_config
VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "bf16": ({}, None),
    "fp8": ({"quantization": "fp8"}, None),
    "fp8-kv": ({"kv_cache_dtype": "fp8"}, None),
    "w4a16": ({}, {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}),
}


def tiny_config():
    from load_tests.make_random_model import qwen3_config

    config = qwen3_config(tiny=True)  # its vocabulary covers the benchmark's token ids (< 10000)
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def model_dir(config, quantization_config: dict | None) -> str:
    path = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    config.save_pretrained(path)
    if quantization_config:
        data = json.loads((path / "config.json").read_text())
        data["quantization_config"] = quantization_config
        (path / "config.json").write_text(json.dumps(data))
    return str(path)


def run_variant(config, variant: str, args) -> dict:
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    engine_args, quantization_config = VARIANTS[variant]
    budget = args.max_num_batched_tokens
    max_len = max(4096 if args.workload else 0,
                  args.context_len + max_tokens(max(args.batch_sizes), args.context_len, args.num_steps, budget))
    llm = LLM(model_dir(config, quantization_config), load_format="dummy",
              dtype="bfloat16" if torch.cuda.is_available() else "float32",
              max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=budget, max_model_len=max_len,
              **engine_args)
    row = {"kv_tokens": llm.engine.ready.kv_capacity_tokens}
    for batch in args.batch_sizes:
        row[batch], _ = octavo_step_seconds(llm, batch, args.context_len, args.num_steps, budget,
                                            args.profile)
    if args.workload:
        prompts, output_lens = reference_workload(args.workload)
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
        start = time.perf_counter()
        llm.generate(prompts, params)
        row["workload"] = sum(output_lens) / (time.perf_counter() - start)
    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def gemm_table(shape: str) -> None:
    """The decode-shaped GEMMs alone (CUDA): bf16 vs FP8 (cuBLAS row-wise) vs W4A16 (Triton)."""
    from kernels import triton_fp8, triton_w4a16

    config = shape_config(shape)
    h, i = config.hidden_size, config.intermediate_size
    print(f"\n{shape} GEMMs (us): M x N x K   bf16   fp8   w4a16")
    for n, k in ((2 * i, h), (h, i)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, s8 = (w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn), \
            w.float().abs().amax(1) / 448
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), device="cuda", dtype=torch.int32)
        scales = torch.rand(k // 128, n, device="cuda", dtype=torch.bfloat16) * 1e-3
        zeros = torch.full_like(scales, 8.0)
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times = [_cuda_us(lambda: x @ w.T), _cuda_us(lambda: triton_fp8.fp8_linear(x, w8, s8)),
                     _cuda_us(lambda: triton_w4a16.w4a16_linear(x, qweight, scales, zeros, 128))]
            print(f"  {m:>4} x {n:>6} x {k:>6} " + " ".join(f"{t:>6.1f}" for t in times))


def _cuda_us(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--workload", type=int, default=256, metavar="NUM_SEQS",
                        help="sequences of the reference workload, on the first shape only (0: skip)")
    parser.add_argument("--gemm", action="store_true", help="also time the bare GEMMs of each shape")
    parser.add_argument("--profile", action="store_true", help="print each decode step's kernels")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU, to check the script")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.batch_sizes, args.context_len, args.num_steps = ["tiny"], [1, 4], 32, 4
        args.workload, args.max_num_batched_tokens = 0, 512

    results: dict[str, dict[str, dict]] = {}
    workload = args.workload
    for shape in args.shapes:
        config = tiny_config() if shape == "tiny" else shape_config(shape)
        args.workload = workload if shape == args.shapes[0] else 0
        results[shape] = {}
        for variant in args.variants:
            results[shape][variant] = row = run_variant(config, variant, args)
            print(f"{shape} {variant}: {json.dumps(row)}", flush=True)  # kept if a later variant fails
        if args.gemm and torch.cuda.is_available():
            gemm_table(shape)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}: decode step ms at {args.context_len}-token contexts (speed-up over bf16); "
          f"reference workload output tok/s")
    header = f"{'shape':<13} {'variant':<7} {'KV tokens':>10} " + \
        " ".join(f"{'B=' + str(b):>14}" for b in args.batch_sizes) + f" {'workload tok/s':>15}"
    print(header)
    for shape, rows in results.items():
        base = rows.get("bf16")
        for variant, row in rows.items():
            cells = []
            for b in args.batch_sizes:
                speedup = f"({base[b] / row[b]:.2f}x)" if base else ""
                cells.append(f"{row[b] * 1e3:>7.2f} {speedup:>6}")
            workload_cell = f"{row['workload']:>15,.0f}" if "workload" in row else f"{'-':>15}"
            print(f"{shape:<13} {variant:<7} {row['kv_tokens']:>10,} " + " ".join(f"{c:>14}" for c in cells)
                  + workload_cell)


if __name__ == "__main__":
    main()
