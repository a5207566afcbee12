"""The shapes of `load_tests/shapes.py` that fit one GPU, each with default engine flags and
random weights made on the device: the reference workload's output tok/s and one request's
decode step, each against its roofline, measured in the same run.

    python -m load_tests.shape_sweep
    python -m load_tests.shape_sweep --shapes qwen3-0.6b llama-3.1-8b --num-seqs 128
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np
import torch

from load_tests.shapes import SHAPES, shape_config
from load_tests.throughput import (measure_device, model_costs, reference_workload, roofline_seconds,
                                   weight_bytes_touched)

_ONE_GPU_SHAPES = [name for name in SHAPES if name != "llama-3.1-70b"]
_DECODE_TOKENS = 256


def measure_shape(name: str, prompts: list[list[int]], output_lens: list[int], bandwidth: float,
                  matmul_flops: float) -> dict[str, float]:
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    config = shape_config(name)
    model_dir = tempfile.mkdtemp(prefix=f"{name}-config-")
    config.save_pretrained(model_dir)
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))  # warm-up
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    start = time.perf_counter()
    llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    # One request alone: its steps are decode steps of batch 1 (one short prefill aside).
    start = time.perf_counter()
    llm.generate([prompts[0][:128]], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=_DECODE_TOKENS))
    step = (time.perf_counter() - start) / _DECODE_TOKENS
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    _, kv_bytes_per_token, _ = model_costs(config)
    return {"tok_per_s": sum(output_lens) / seconds,
            "roofline_tok_per_s": sum(output_lens) / roofline_seconds(
                config, np.array(list(map(len, prompts))), np.array(output_lens), bandwidth, matmul_flops),
            "step_ms": step * 1e3,
            "step_roofline_ms": (weight_bytes_touched(config, 1) + (128 + _DECODE_TOKENS / 2) * kv_bytes_per_token) / bandwidth * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=_ONE_GPU_SHAPES, default=_ONE_GPU_SHAPES)
    parser.add_argument("--num-seqs", type=int, default=256, help="sequences of the reference workload")
    args = parser.parse_args()
    prompts, output_lens = reference_workload(args.num_seqs)
    bandwidth, matmul_flops = measure_device()
    torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_flops / 1e12:.0f} "
          f"TFLOP/s; reference workload of {len(prompts)} sequences; default engine flags", flush=True)
    print(f"{'shape':<14} {'roofline tok/s':>15} {'octavo tok/s':>13} {'of roofline':>12} "
          f"{'step roofline ms':>17} {'step ms':>8} {'x roofline':>11}", flush=True)
    for name in args.shapes:
        r = measure_shape(name, prompts, output_lens, bandwidth, matmul_flops)
        print(f"{name:<14} {r['roofline_tok_per_s']:>15,.0f} {r['tok_per_s']:>13,.0f} "
              f"{r['tok_per_s'] / r['roofline_tok_per_s']:>11.0%} {r['step_roofline_ms']:>17.3f} "
              f"{r['step_ms']:>8.3f} {r['step_ms'] / r['step_roofline_ms']:>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
