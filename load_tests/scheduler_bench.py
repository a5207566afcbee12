"""The engine core's host time per decode step: `Scheduler.schedule` and
`Scheduler.update_from_output` at batch B, with the steps pipelined as in ASYNC mode (step N+1
is scheduled before step N's tokens are taken). No device: the tokens come from a random
generator, so this measures the scheduler's own Python work, the part of a step's host time
that grows with the batch.

    python -m load_tests.scheduler_bench                       # batches 1, 64 and 256
    python -m load_tests.scheduler_bench --batch-sizes 64 --steps 2000
"""

from __future__ import annotations

import argparse
import random
import time

from engine_core.kv_cache_manager import KVCacheManager
from engine_core.protocol import EngineCoreRequest, ModelRunnerOutput, SamplingParams
from engine_core.request import Request
from engine_core.scheduler import Scheduler

BLOCK_SIZE = 16


def measure(batch: int, prompt_len: int, num_steps: int, seed: bool) -> tuple[float, float]:
    """Mean microseconds per steady decode step of (schedule, update_from_output)."""
    max_model_len = prompt_len + num_steps + 8
    num_blocks = batch * (-(-max_model_len // BLOCK_SIZE) + 1)
    scheduler = Scheduler(KVCacheManager(num_blocks, BLOCK_SIZE, True), max_num_batched_tokens=batch * prompt_len,
                          max_num_seqs=batch, max_model_len=max_model_len)
    rng = random.Random(0)
    for i in range(batch):
        params = SamplingParams(temperature=0.6, max_tokens=num_steps + 4, ignore_eos=True,
                                seed=i if seed else None)
        prompt = [rng.randrange(1000, 10000) for _ in range(prompt_len)]
        scheduler.add_request(Request(EngineCoreRequest(f"req-{i}", prompt, params), frozenset([0])))
    in_flight = scheduler.schedule()  # the prefill
    schedule_s = update_s = 0.0
    for _ in range(num_steps):
        start = time.perf_counter()
        step = scheduler.schedule()
        scheduled = time.perf_counter()
        request_ids = list(in_flight.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(request_ids=request_ids,
                                          sampled_token_ids=[[rng.randrange(1, 10000)] for _ in request_ids])
        taken = time.perf_counter()
        scheduler.update_from_output(in_flight, runner_output)
        end = time.perf_counter()
        schedule_s += scheduled - start
        update_s += end - taken
        in_flight = step
    return schedule_s / num_steps * 1e6, update_s / num_steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", action="store_true", help="seeded requests (as the GPU benchmarks send)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per batch size; the fastest is kept, "
                        "as the others measure the machine's other load too")
    args = parser.parse_args()
    print(f"{'batch':>6} {'schedule (us)':>14} {'update (us)':>12} {'per request (us)':>17}")
    for batch in args.batch_sizes:
        schedule_us, update_us = min((measure(batch, args.prompt_len, args.steps, args.seed)
                                      for _ in range(args.repeats)), key=sum)
        print(f"{batch:>6} {schedule_us:14.1f} {update_us:12.1f} {(schedule_us + update_us) / batch:17.2f}")


if __name__ == "__main__":
    main()
