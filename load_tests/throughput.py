"""Offline throughput on the reference workload (nano-vllm's benchmark), side by side with
Hugging Face transformers on the same model and GPU, and against the workload's roofline.

    python -m load_tests.throughput                      # Qwen3-0.6B shape, random bf16 weights
    python -m load_tests.throughput --hf-num-seqs 0      # Octavo only
    python -m load_tests.throughput --shape qwen3-30b-a3b --hf-num-seqs 8   # a mixture of experts

The workload: 256 sequences, prompt lengths uniform in [100, 1024] of random token ids below
10000, output lengths uniform in [100, 1024], ignore_eos, temperature 0.6, seeded with
random.seed(0). Throughput = output tokens / wall time of one generate call after a warm-up.
transformers runs the first --hf-num-seqs sequences only (it is ~30x slower). Shapes other than
Qwen3-0.6B get random weights made on the device: Octavo's by --load-format dummy, and
transformers' (only if --hf-num-seqs is given) by its own init after Octavo has shut down.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time

import numpy as np
import torch

from load_tests.shapes import SHAPES, shape_config



def measure_device() -> tuple[float, float]:
    """This GPU's device-to-device copy bandwidth (bytes read + written per second) and bf16
    matmul rate (8192^3), the two ceilings of the roofline, measured in the same run."""
    def timed(fn, repeats: int = 20) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    flops = 2 * 8192 ** 3 / timed(lambda: a @ a)
    return bandwidth, flops


def reference_workload(num_seqs: int = 256) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_seqs)]
    output_lens = [random.randint(100, 1024) for _ in range(num_seqs)]
    return prompts, output_lens


def moe_shape(config) -> tuple[int, int, int, int]:
    """(sparse layers, experts per layer, experts per token, parameters of one expert); all 0
    for a dense model. Mixtral's experts are `intermediate_size` wide and every layer is sparse;
    Qwen3-MoE's are `moe_intermediate_size` wide, its dense layers `intermediate_size`."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    if not num_experts:
        return 0, 0, 0, 0
    if config.model_type == "mixtral":
        return config.num_hidden_layers, num_experts, config.num_experts_per_tok, 3 * config.hidden_size * \
            config.intermediate_size
    sparse = sum(1 for i in range(config.num_hidden_layers)
                 if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0)
    return sparse, num_experts, config.num_experts_per_tok, 3 * config.hidden_size * config.moe_intermediate_size


def model_costs(config) -> tuple[int, int, int]:
    """A bf16 forward's costs: bytes of all its weights (every expert of a mixture of experts:
    `weight_bytes_touched` counts those a step reads), KV bytes per token of context, and matmul
    FLOPs per token in the layers (the k experts a token uses; the LM head's come on top for
    tokens that sample)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    sparse, num_experts, top_k, expert_params = moe_shape(config)
    # Attention in every layer, a dense MLP in the others, a router in the sparse ones.
    dense_params = layers * (h * (q + 2 * kv) + q * h) + (layers - sparse) * 3 * h * config.intermediate_size \
        + sparse * h * num_experts
    weight_bytes = (dense_params + sparse * num_experts * expert_params + config.vocab_size * h) * 2
    return weight_bytes, layers * 2 * kv * 2, 2 * (dense_params + sparse * top_k * expert_params)


def weight_bytes_touched(config, num_tokens: int) -> float:
    """Expected bytes of weights a forward of `num_tokens` tokens reads: every dense weight,
    and of each sparse layer's experts only those some token is routed to. Under uniform
    routing a token's k experts are a uniformly random k-subset of the E, so a given expert is
    missed by one token with probability 1 - k/E, and by all B tokens (chosen independently)
    with probability (1 - k/E)^B; by linearity of expectation a layer touches
    E * (1 - (1 - k/E)^B) experts on average (k at B = 1, nearly E once B * k >> E). The
    roofline's time is linear in bytes, so this expectation is the expected time's too. Real
    routers are skewed, which touches fewer experts: a bound for uniform load, not a floor."""
    weight_bytes = model_costs(config)[0]
    sparse, num_experts, top_k, expert_params = moe_shape(config)
    if not sparse:
        return weight_bytes
    untouched = num_experts * (1 - top_k / num_experts) ** num_tokens
    return weight_bytes - sparse * untouched * expert_params * 2


def roofline_seconds(config, prompt_lens: np.ndarray, output_lens: np.ndarray, bandwidth: float,
                     matmul_flops: float) -> float:
    """Every sequence decoding in one batch: each step reads the weights once (of a mixture of
    experts, the experts its batch touches) plus every active sequence's KV at the copy
    bandwidth; prefill runs at the matmul rate. A bound no engine reaches, for scale."""
    _, kv_bytes_per_token, layer_flops_per_token = model_costs(config)
    seconds = 0.0
    for step in range(int(output_lens.max())):
        active = output_lens > step
        seconds += (weight_bytes_touched(config, int(active.sum()))
                    + (prompt_lens[active] + step).sum() * kv_bytes_per_token) / bandwidth
    return seconds + layer_flops_per_token * prompt_lens.sum() / matmul_flops


def run_octavo(model_dir: str, prompts, output_lens, args) -> dict:
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    start = time.perf_counter()
    llm = LLM(model_dir, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=4096,
              enforce_eager=args.enforce_eager, distributed_executor_backend=args.distributed_executor_backend,
              tensor_parallel_size=args.tensor_parallel_size,
              load_format="auto" if args.shape == "qwen3-0.6b" else "dummy",
              **({"block_size": args.block_size} if args.block_size else {}))
    startup = time.perf_counter() - start
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))  # warm-up
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    host_profiler = cProfile.Profile() if args.profile == "host" else None
    device_profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) \
        if args.profile == "device" else None
    torch.cuda.synchronize()
    allocator_before = torch.cuda.memory_stats()
    start = time.perf_counter()
    if host_profiler:
        host_profiler.enable()
    if device_profiler:
        device_profiler.start()
    outputs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if host_profiler:
        host_profiler.disable()
        pstats.Stats(host_profiler).sort_stats("tottime").print_stats(30)
    if device_profiler:
        device_profiler.stop()
        events = device_profiler.key_averages()
        busy_us = sum(e.device_time_total for e in events)
        print(events.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
        print(f"GPU busy {busy_us / 1e6:.2f} s of {elapsed:.2f} s wall")
        print_idle_timeline(device_profiler.events())
        # A cudaFree (and so a retry after one) synchronizes the device: the host then stops
        # running ahead of it.
        allocator = torch.cuda.memory_stats()
        print("allocator during the run: " + ", ".join(
            f"{key} {allocator.get(key, 0) - allocator_before.get(key, 0)}"
            for key in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")))
    llm.engine.shutdown()  # a worker process gives its GPU memory back before transformers runs
    num_out = sum(len(o.token_ids) for o in outputs)
    assert num_out == sum(output_lens), (num_out, sum(output_lens))
    return {"engine": "octavo", "seconds": elapsed, "output_tokens": num_out,
            "tok_per_s": num_out / elapsed, "startup_s": startup}


def print_idle_timeline(events, num_bins: int = 20) -> None:
    """Where the GPU sat idle: kernel and copy intervals merged, then idle time per slice of
    the run and the largest gaps, to tell start-up, prefill, steady decode and tail apart."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    if not spans:
        return
    first, last = spans[0][0], max(end for _, end in spans)
    gaps, busy_until = [], first
    for begin, end in spans:
        if begin > busy_until:
            gaps.append((busy_until, begin - busy_until))
        busy_until = max(busy_until, end)
    width = (last - first) / num_bins
    begins, lengths = np.array(gaps).reshape(-1, 2).T
    edges = first + width * np.arange(num_bins + 1)
    # Each gap's overlap with each slice.
    idle = np.clip(np.minimum(begins[:, None] + lengths[:, None], edges[None, 1:])
                   - np.maximum(begins[:, None], edges[None, :-1]), 0, None).sum(axis=0)
    print(f"GPU idle {lengths.sum() / 1e6:.3f} s between its first and last kernel "
          f"({(last - first) / 1e6:.2f} s), in {len(gaps)} gaps; per slice of {width / 1e3:.0f} ms:")
    print("  " + " ".join(f"{i / width:.0%}" for i in idle))
    sizes = lengths
    for low, high in ((0, 10), (10, 50), (50, 200), (200, 1000), (1000, float("inf"))):
        chosen = sizes[(sizes >= low) & (sizes < high)]
        print(f"  gaps of {low}-{high} us: {len(chosen)}, {chosen.sum() / 1e3:.1f} ms")
    for begin, length in sorted(gaps, key=lambda g: -g[1])[:10]:
        print(f"  gap of {length / 1e3:.2f} ms at {(begin - first) / 1e6:.3f} s")


def run_hf_continuous(model, prompts, output_lens) -> dict:
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max(output_lens), do_sample=True, temperature=0.6,
                              eos_token_id=None)
    model.generate_batch(inputs=[prompts[0][:16]], generation_config=GenerationConfig(max_new_tokens=4))
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    num_out = sum(len(r.generated_tokens) for r in results.values())
    return {"engine": "transformers generate_batch", "seconds": elapsed, "output_tokens": num_out,
            "tok_per_s": num_out / elapsed}


def run_hf_static(model, prompts, output_lens, batch_size: int = 64) -> dict:
    num_out = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        new = max(output_lens[i:i + batch_size])
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=True, temperature=0.6, pad_token_id=0)
        num_out += sum(output_lens[i:i + batch_size])  # only the requested tokens count
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"engine": f"transformers generate (static, batches of {batch_size})", "seconds": elapsed,
            "output_tokens": num_out, "tok_per_s": num_out / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--hf-num-seqs", type=int,
                        help="sequences given to transformers (0: skip; default: 32 for qwen3-0.6b, else 0)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b",
                        help="the model shape (load_tests/shapes.py); any but qwen3-0.6b runs with random weights "
                             "made on the device (--load-format dummy) (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, help="default: the engine's, from the device")
    parser.add_argument("--max-num-batched-tokens", type=int, help="default: the engine's, from the device")
    parser.add_argument("--block-size", type=int, help="KV cache block size (default: the engine's)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--distributed-executor-backend", choices=("uni", "mp"), default=None,
                        help="mp: the worker in a process of its own (the tensor-parallel path at size 1)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs to shard the model over; the roofline counts each GPU's bandwidth and FLOPs")
    parser.add_argument("--profile", choices=["host", "device"],
                        help="print where the time goes: the host's Python (cProfile) or GPU kernels")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    prompts, output_lens = reference_workload()
    prompts, output_lens = prompts[:args.num_seqs], output_lens[:args.num_seqs]
    model_dir = tempfile.mkdtemp(prefix=f"{args.shape}-random-")
    config = shape_config(args.shape)
    hf_model = None
    if args.hf_num_seqs is None:
        args.hf_num_seqs = 32 if args.shape == "qwen3-0.6b" else 0
    if args.shape == "qwen3-0.6b":
        torch.manual_seed(0)
        hf_model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        hf_model.save_pretrained(model_dir)
    else:  # gigabytes of weights: made on the device from config.json alone
        config.save_pretrained(model_dir)
    print(f"workload: {len(prompts)} seqs, {sum(map(len, prompts))} prompt tokens, {sum(output_lens)} output tokens")

    bandwidth, matmul_flops = measure_device()
    torch.cuda.empty_cache()  # give the measurement's buffers back before the engine sizes its KV cache
    results = [run_octavo(model_dir, prompts, output_lens, args)]
    roofline = roofline_seconds(config, np.array(list(map(len, prompts))), np.array(output_lens),
                                bandwidth * args.tensor_parallel_size, matmul_flops * args.tensor_parallel_size)
    results[0]["roofline_fraction"] = roofline / results[0]["seconds"]
    if args.hf_num_seqs:
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        if hf_model is None:
            with torch.device("cuda"):
                hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        hf_model = hf_model.to("cuda").eval()
        n = args.hf_num_seqs
        results.append(run_hf_continuous(hf_model, prompts[:n], output_lens[:n]))
        results.append(run_hf_static(hf_model, prompts[:n], output_lens[:n]))

    print(f"\n{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
          f"{matmul_flops / 1e12:.0f} TFLOP/s; roofline {roofline:.2f} s = {sum(output_lens) / roofline:,.0f} "
          f"output tok/s")
    print(f"{'engine':<48} {'seqs':>5} {'seconds':>8} {'out tok/s':>10} {'vs octavo':>10}")
    for r in results:
        seqs = len(prompts) if r["engine"] == "octavo" else args.hf_num_seqs
        print(f"{r['engine']:<48} {seqs:>5} {r['seconds']:>8.2f} {r['tok_per_s']:>10,.0f} "
              f"{results[0]['tok_per_s'] / r['tok_per_s']:>9.1f}x")
    print(f"octavo: {results[0]['roofline_fraction']:.0%} of the roofline; start-up {results[0]['startup_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth,
                       "matmul_flops": matmul_flops, "roofline_s": roofline, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
