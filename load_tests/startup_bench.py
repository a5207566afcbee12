"""Start-up of a large model shape from its config.json alone (`--load-format dummy`): the
time to a ready engine, its KV capacity, and one request's decode speed.

    python -m load_tests.startup_bench --shape llama-3.1-8b
    python -m load_tests.startup_bench --shape llama-3.1-70b --tensor-parallel-size 2

No checkpoint is read: every weight is random on the device, so the shapes whose checkpoints
cannot be written here (16 GB, 140 GB) can still be started, sized and timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from load_tests.shapes import SHAPES, shape_config

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="load_tests/shapes.py")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", choices=("uni", "mp"), default=None)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()

    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    model_dir = tempfile.mkdtemp(prefix=f"{args.shape}-config-")
    shape_config(args.shape).save_pretrained(model_dir)
    start = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend)
    startup = time.perf_counter() - start
    params = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0)
    llm.generate([list(range(1, 129))], params)  # warm-up
    start = time.perf_counter()
    out = llm.generate([list(range(1, 129))], params)[0]
    decode = time.perf_counter() - start
    ready = llm.engine.ready
    llm.engine.shutdown()
    print(f"{args.shape}, TP={args.tensor_parallel_size}, dummy weights, bf16: ready in {startup:.1f} s; KV cache "
          f"{ready.kv_capacity_tokens:,} tokens ({ready.max_concurrency:.1f}x max_model_len {ready.max_model_len}); "
          f"one request: {len(out.token_ids) / decode:,.0f} tok/s")


if __name__ == "__main__":
    main()
