"""Decode-step microbenchmark: one decode step of B requests at a given context length, through
Octavo's engine and through transformers on the same model and GPU, against the step's roofline.

    python -m load_tests.decode_bench                    # Qwen3-0.6B shape, random bf16 weights
    python -m load_tests.decode_bench --batch-sizes 1 64 --context-len 2048 --hf-batch-sizes
    python -m load_tests.decode_bench --shape qwen3-30b-a3b --hf-batch-sizes 1 16 64

Octavo's step is `EngineCore.step` in its steady state: B requests decoding, CUDA graphs,
sampling at temperature 0.6, async scheduling; the figure is the wall time of many steps over
their number. transformers' step is one `forward` of B tokens over its KV cache of the same
context, then the argmax, timed alone. The roofline is the larger of (weights + every
request's KV) / copy bandwidth and FLOPs / matmul rate, both measured in the same run; of a
mixture of experts it counts the experts a batch of B tokens is expected to touch
(`load_tests.throughput.weight_bytes_touched`). Shapes other than Qwen3-0.6B get random weights
made on the device (Octavo: --load-format dummy; transformers: its own random init).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np
import torch

from load_tests.shapes import SHAPES, shape_config
from load_tests.throughput import measure_device, model_costs, weight_bytes_touched

_WARMUP_STEPS = 8


def _sync() -> None:
    if torch.cuda.is_available():  # the CPU runs a tiny shape to check the script
        torch.cuda.synchronize()


def max_tokens(batch: int, context_len: int, num_steps: int, max_num_batched_tokens: int) -> int:
    """Output tokens each request may need: those finishing their prompt early decode while the
    others prefill, then come the warm-up and the timed steps (and the steps in flight)."""
    num_prefill_steps = -(-batch * context_len // max_num_batched_tokens) + 1
    return num_prefill_steps + _WARMUP_STEPS + 2 * num_steps + 4  # timed, then profiled


def print_step_kernels(profiler: torch.profiler.profile, num_steps: int, batch: int, top: int = 25) -> None:
    """The device kernels of one step: microseconds and launches per step, largest first."""
    kernels = [e for e in profiler.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) / num_steps
    print(f"batch {batch}: {total:.1f} us of kernels per step, "
          f"{sum(e.count for e in kernels) / num_steps:.0f} launches")
    for e in kernels[:top]:
        print(f"  {e.device_time_total / num_steps:8.1f} us {e.count / num_steps:6.1f}x  {e.key[:90]}")


def octavo_step_seconds(llm, batch: int, context_len: int, num_steps: int,
                        max_num_batched_tokens: int, profile: bool = False) -> tuple[float, int]:
    """Seconds per decode step of `batch` requests, and the mean total context of those steps."""
    from engine_core.protocol import EngineCoreRequest, SamplingParams

    engine = llm.engine
    rng = np.random.default_rng(batch)
    params = SamplingParams(temperature=0.6, ignore_eos=True,
                            max_tokens=max_tokens(batch, context_len, num_steps, max_num_batched_tokens))
    generated: dict[str, int] = {}
    for i in range(batch):
        request_id = f"decode-{batch}-{i}"
        engine.add_request(EngineCoreRequest(request_id, rng.integers(0, 10000, context_len).tolist(), params))
        generated[request_id] = 0

    def step() -> None:
        for out in engine.step().outputs:
            generated[out.request_id] += len(out.new_token_ids)

    while min(generated.values()) == 0:  # until every prompt is in: then every step decodes all
        step()
    for _ in range(_WARMUP_STEPS):
        step()
    total_context = batch * context_len + sum(generated.values())
    _sync()
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    _sync()
    seconds = (time.perf_counter() - start) / num_steps
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for _ in range(num_steps):
                engine.step()
            torch.cuda.synchronize()
        print_step_kernels(profiler, num_steps, batch)
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, total_context + batch * (num_steps - 1) // 2


@torch.inference_mode()
def transformers_step_seconds(model, batch: int, context_len: int, num_steps: int = 5) -> float:
    """Median seconds of one greedy decode forward of `batch` requests over `context_len` cached tokens."""
    ids = torch.randint(0, 10000, (batch, context_len), device="cuda")
    cache = model.model(ids, use_cache=True).past_key_values  # the base model: no prompt logits
    next_ids = ids[:, -1:]
    times = []
    for _ in range(num_steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(next_ids, past_key_values=cache, use_cache=True).logits
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del cache
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b",
                        help="the model shape (load_tests/shapes.py; default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--context-len", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--num-steps", type=int, default=64, help="timed Octavo steps per batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--distributed-executor-backend", choices=("uni", "mp"), default=None,
                        help="mp: the worker in a process of its own (the tensor-parallel path at size 1)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs to shard the model over; the roofline counts each GPU's bandwidth and FLOPs")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="*", default=None,
                        help="those of --batch-sizes transformers runs (default: all; none: skip it)")
    parser.add_argument("--profile", action="store_true", help="print each batch size's kernels per step")
    args = parser.parse_args()
    hf_batch_sizes = args.batch_sizes if args.hf_batch_sizes is None else \
        [batch for batch in args.hf_batch_sizes if batch in args.batch_sizes]

    from transformers import AutoModelForCausalLM

    from engine_core.llm import LLM

    config = shape_config(args.shape)
    model_dir = tempfile.mkdtemp(prefix=f"{args.shape}-random-")
    torch.manual_seed(0)
    small = args.shape == "qwen3-0.6b"
    if small:
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        hf_model.save_pretrained(model_dir)
    else:  # gigabytes of weights: made on the device, after Octavo has given it back
        config.save_pretrained(model_dir)
    bandwidth, matmul_flops = measure_device()
    torch.cuda.empty_cache()
    _, kv_bytes_per_token, layer_flops_per_token = model_costs(config)
    lm_head_flops = 2 * config.vocab_size * config.hidden_size

    budget = args.max_num_batched_tokens
    llm = LLM(model_dir, dtype="bfloat16", max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=budget,
              distributed_executor_backend=args.distributed_executor_backend,
              tensor_parallel_size=args.tensor_parallel_size, load_format="auto" if small else "dummy",
              max_model_len=args.context_len + max_tokens(max(args.batch_sizes), args.context_len,
                                                          args.num_steps, budget))
    rows = {}
    for batch in args.batch_sizes:
        seconds, total_context = octavo_step_seconds(llm, batch, args.context_len, args.num_steps, budget,
                                                     args.profile)
        tp = args.tensor_parallel_size
        roofline = max((weight_bytes_touched(config, batch) + total_context * kv_bytes_per_token) / (tp * bandwidth),
                       batch * (layer_flops_per_token + lm_head_flops) / (tp * matmul_flops))
        rows[batch] = {"octavo": seconds, "roofline": roofline, "context": total_context / batch}
    llm.engine.shutdown()
    del llm
    gc.collect()  # the in-process worker's KV cache sits in reference cycles
    torch.cuda.empty_cache()

    if hf_batch_sizes:
        if small:
            hf_model = hf_model.to("cuda")
        else:
            with torch.device("cuda"):
                hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        hf_model.eval()
        for batch in hf_batch_sizes:
            rows[batch]["transformers"] = transformers_step_seconds(hf_model, batch, args.context_len)
            torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
          f"{matmul_flops / 1e12:.0f} TFLOP/s; {args.shape} shape, bf16, {args.context_len}-token prompts")
    print(f"{'batch':>5} {'context':>8} {'roofline ms':>12} {'octavo ms':>10} {'tok/s':>9} {'of roofline':>12} "
          f"{'transformers ms':>16} {'octavo is':>10}")
    for batch, r in rows.items():
        hf = r.get("transformers")
        hf_ms, ratio = (f"{hf * 1e3:.3f}", f"{hf / r['octavo']:.1f}x") if hf else ("-", "-")
        print(f"{batch:>5} {r['context']:>8.0f} {r['roofline'] * 1e3:>12.3f} {r['octavo'] * 1e3:>10.3f} "
              f"{batch / r['octavo']:>9,.0f} {r['roofline'] / r['octavo']:>11.0%} {hf_ms:>16} {ratio:>10}")


if __name__ == "__main__":
    main()
