"""EngineCore: the scheduler and the executor, stepped by whoever owns it (the engine-core
process's busy loop, or the offline `LLM`)."""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable

from engine_core.config import EngineConfig
from engine_core.executor import Executor, WorkerFailedError
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    FinishReason,
    ModelInfo,
    SchedulerOutput,
    now,
)
from engine_core.request import Request
from engine_core.scheduler import Scheduler
from engine_core.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)

# Failed steps in a row, none succeeding between them, that mean the engine is broken rather
# than a request: a bad request fails alone within a step or two of the failed batch it was
# in, while a broken device fails every step. Then the error propagates, and the engine-core
# process dies and is restarted.
MAX_FAILED_STEPS_IN_A_ROW = 8


class StepMode(enum.Enum):
    """How a step orders launching work on the device and collecting it."""

    # Launch a step and collect it at once. On the CPU the forward runs inside the launch,
    # so any other order would only delay the outputs.
    SYNC = enum.auto()
    # Launch step N+1, then collect step N: the host schedules the next step and processes
    # this one's outputs while the device computes.
    ASYNC = enum.auto()
    # Collect step N, launch step N+1, then return N's outputs: the device computes while the
    # caller handles them. For a GPU without async scheduling (speculative decoding: the next
    # step's drafts need this step's tokens).
    COLLECT_FIRST = enum.auto()


def choose_step_mode(config: EngineConfig, device: str) -> StepMode:
    on_gpu = device.startswith("cuda")
    async_scheduling = config.async_scheduling
    if async_scheduling is None:
        async_scheduling = on_gpu and config.speculative_config is None
    if async_scheduling:
        return StepMode.ASYNC
    return StepMode.COLLECT_FIRST if on_gpu else StepMode.SYNC


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = Executor.create(config)
        info = self.executor.model_info()
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.eos_token_ids = frozenset(info.eos_token_ids)
        self.ready = self._make_ready(info)
        self.kv_cache_manager = KVCacheManager(info.num_kv_blocks, config.block_size,
                                               config.enable_prefix_caching)
        self.structured_output = StructuredOutputManager(info.model_path, info.vocab_size, info.eos_token_ids)
        self.scheduler = Scheduler(self.kv_cache_manager, info.max_num_batched_tokens,
                                   info.max_num_seqs, self.max_model_len, config.speculative_config,
                                   self.structured_output)
        # Requests refused at admission; reported with the next step's outputs.
        self.rejected: list[EngineCoreOutput] = []
        # Steps launched on the device and not yet collected, oldest first.
        self.in_flight: deque[SchedulerOutput] = deque()
        self.num_failed_steps = 0  # in a row
        self.set_step_mode(choose_step_mode(config, info.device))
        logger.info("model %s on %s (%s): KV cache of %d tokens, max concurrency %.2fx at "
                    "max_model_len %d", info.model_path, info.device, info.dtype,
                    self.ready.kv_capacity_tokens, self.ready.max_concurrency, self.max_model_len)

    def _make_ready(self, info: ModelInfo) -> EngineReady:
        """The handshake, once the KV cache is known to hold a whole max_model_len request."""
        block_size = self.config.block_size
        kv_capacity = info.num_kv_blocks * block_size
        if kv_capacity < info.max_model_len:
            raise ValueError(
                f"max_model_len ({info.max_model_len}) must be <= the KV cache capacity of "
                f"{kv_capacity} tokens: lower max_model_len or give the KV cache more memory")
        return EngineReady(
            model_path=info.model_path,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            num_kv_blocks=info.num_kv_blocks,
            block_size=block_size,
            kv_capacity_tokens=kv_capacity,
            max_concurrency=kv_capacity / info.max_model_len,
            max_num_seqs=info.max_num_seqs,
            max_num_batched_tokens=info.max_num_batched_tokens,
            device=info.device,
            dtype=info.dtype,
            eos_token_ids=info.eos_token_ids,
        )

    def set_step_mode(self, mode: StepMode) -> None:
        """Chosen once at start-up (tests force a GPU's mode on the CPU)."""
        self.step_mode = mode
        run_step: dict[StepMode, Callable[[list[EngineCoreOutput]], int]] = {
            StepMode.SYNC: self._step_sync,
            StepMode.ASYNC: self._step_async,
            StepMode.COLLECT_FIRST: self._step_collect_first,
        }
        self._run_step = run_step[mode]

    def validate_request(self, request: EngineCoreRequest) -> None:
        """Raise ValueError naming what is wrong with a request, before any work is done."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad!r}")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens; "
                             f"the prompt has {len(prompt)} tokens")
        request.sampling_params.validate(self.vocab_size)
        if request.sampling_params.structured_outputs is not None:
            self.structured_output.check_supported()
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; a bad one never raises here but finishes with an error output,
        so one client's mistake cannot take the engine (or other requests) down."""
        try:
            self.validate_request(request)
        except ValueError as e:
            self.rejected.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                  finish_reason=FinishReason.ERROR, error=str(e)))
            return
        self.scheduler.add_request(Request(request, self.eos_token_ids))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.rejected or self.in_flight) or self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """Run the pipeline one step in the engine's StepMode and return the outputs collected.
        A step the workers fail to run ends only the request to blame (`_recover`)."""
        outputs, self.rejected = self.rejected, []
        num_tokens = self._run_step(outputs)
        if self.scheduler.grammar_failures:
            outputs.extend(self.scheduler.grammar_failures)
            self.scheduler.grammar_failures = []
        return self.make_outputs(outputs, num_tokens)

    def make_outputs(self, outputs: list[EngineCoreOutput], num_batched_tokens: int = 0) -> EngineCoreOutputs:
        """Outputs with the scheduler's stats since the last ones: every message carries them,
        even one without tokens."""
        stats = self.scheduler.make_stats()
        stats.num_batched_tokens = num_batched_tokens
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=stats, timestamp=now())

    # Each step function adds the outputs it collects to `outputs` and returns the number of
    # tokens of the step collected (0: none). A step that samples under grammars is launched
    # only once no older step is in flight: its masks need their tokens.

    def _step_sync(self, outputs: list[EngineCoreOutput]) -> int:
        self._launch_next(outputs)
        return self._collect(outputs) if self.in_flight else 0

    def _step_async(self, outputs: list[EngineCoreOutput]) -> int:
        step = self._schedule()
        if step is not None and step.grammar_request_ids:
            return self._step_async_under_grammar(step, outputs)
        launched = step is not None and self._launch(step, outputs)
        if not self.in_flight:
            return 0
        if launched and len(self.in_flight) == 1:
            return 0  # the pipeline's first step: collected next time
        return self._collect(outputs)

    def _step_async_under_grammar(self, step: SchedulerOutput, outputs: list[EngineCoreOutput]) -> int:
        """A step sampling under grammars, in ASYNC mode: the step in flight is collected
        first, as the masks need its tokens."""
        failures = self.num_failed_steps  # a failed collect adds one; a good one resets it to 0
        num_tokens = self._collect(outputs) if self.in_flight else 0
        if self.num_failed_steps <= failures:  # else the recovery preempted this step's requests
            self._launch_under_grammar(step, outputs)
        return num_tokens

    def _step_collect_first(self, outputs: list[EngineCoreOutput]) -> int:
        num_tokens = self._collect(outputs) if self.in_flight else 0
        self._launch_next(outputs)
        return num_tokens

    def _schedule(self) -> SchedulerOutput | None:
        """The next step, if there is work."""
        return self.scheduler.schedule() if self.scheduler.has_unfinished_requests() else None

    def _launch(self, scheduler_output: SchedulerOutput, outputs: list[EngineCoreOutput]) -> bool:
        """Launch a scheduled step; whether it is in flight."""
        try:
            self.executor.launch(scheduler_output)
        except Exception as e:
            outputs.extend(self._recover(scheduler_output, e))
            return False
        self.in_flight.append(scheduler_output)
        return True

    def _launch_next(self, outputs: list[EngineCoreOutput]) -> None:
        """Schedule and launch a step, if there is work."""
        step = self._schedule()
        if step is not None and step.grammar_request_ids:
            self._launch_under_grammar(step, outputs)
        elif step is not None:
            self._launch(step, outputs)

    def _launch_under_grammar(self, step: SchedulerOutput, outputs: list[EngineCoreOutput]) -> None:
        """Launch a step sampling under grammars, no older step in flight (the masks need the
        matchers to have taken every token before it). The masks are filled on a thread while
        the step is launched (llguidance's fill releases the GIL), so the two largest host
        costs of the step overlap each other and the forward; then the workers sample."""
        assert not self.in_flight, "grammar masks before the step before is collected"
        bitmask = self.scheduler.start_grammar_bitmask(step)
        try:
            self.executor.launch(step)
        except Exception as e:
            bitmask.exception()  # the fill reads the scheduler's requests: it ends first
            outputs.extend(self._recover(step, e))
            return
        self.in_flight.append(step)
        try:
            self.executor.sample_under_grammar(bitmask.result())
        except Exception as e:
            self.in_flight.pop()
            outputs.extend(self._recover(step, e))

    def _collect(self, outputs: list[EngineCoreOutput]) -> int:
        """Add the oldest step in flight's outputs to `outputs`; return its number of tokens."""
        scheduler_output = self.in_flight.popleft()
        try:
            runner_output = self.executor.collect()
        except Exception as e:
            outputs.extend(self._recover(scheduler_output, e))
            return 0
        self.num_failed_steps = 0
        outputs.extend(self.scheduler.update_from_output(scheduler_output, runner_output))
        return scheduler_output.total_num_scheduled_tokens

    def _recover(self, failed: SchedulerOutput, error: Exception) -> list[EngineCoreOutput]:
        """The workers failed to run a step: drop every step in flight, there and here, and
        let the scheduler end the request that failed alone, or retry a failed batch's
        requests alone, one per step, to find the one to blame. Returns the error outputs."""
        if isinstance(error, WorkerFailedError):
            raise error  # no request to blame: the engine-core process dies and is restarted
        self.num_failed_steps += 1
        if self.num_failed_steps > MAX_FAILED_STEPS_IN_A_ROW:
            logger.error("%d steps failed in a row, none succeeding: the engine is broken, not a request",
                         self.num_failed_steps)
            raise error
        self.in_flight.clear()
        self.executor.reset()
        outputs = self.scheduler.recover_from_failed_step(
            failed, f"the engine failed to run this request: {type(error).__name__}: {error}")
        if outputs:
            logger.error("request %s failed alone and ends with an error", outputs[0].request_id,
                         exc_info=error)
        else:
            logger.warning("a step of %d requests failed (%s: %s): they run alone, one per step, "
                           "until the cause is found", len(failed.num_scheduled_tokens),
                           type(error).__name__, error)
        return outputs

    # ---- utility RPC targets ----

    def reset_prefix_cache(self) -> bool:
        self.kv_cache_manager.reset_prefix_cache()
        return True

    def get_kv_cache_stats(self) -> dict[str, float]:
        kv = self.kv_cache_manager
        return {"num_free_blocks": kv.num_free_blocks, "num_total_blocks": kv.block_pool.num_blocks,
                "usage": kv.usage()}

    def shutdown(self) -> None:
        self.scheduler.abort_requests(list(self.scheduler.requests))
        self.executor.shutdown()
        self.structured_output.shutdown()
