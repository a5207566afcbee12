"""Executor: runs the step on the workers.

With one device the worker lives in the engine-core process and a step is a function call;
tensor parallelism (one worker process per GPU rank) plugs in behind the same interface.
"""

from __future__ import annotations

from engine_core.config import EngineConfig
from engine_core.protocol import ModelRunnerOutput, SchedulerOutput
from workers.worker import ModelInfo, Worker


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1 in this version, got {config.tensor_parallel_size}")
        self.worker = Worker(config)

    def model_info(self) -> ModelInfo:
        return self.worker.model_info()

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.model_runner.launch(scheduler_output)

    def collect(self) -> ModelRunnerOutput:
        return self.worker.model_runner.collect()

    def reset(self) -> None:
        """Drop every request and step in flight on the workers, after a step failed."""
        self.worker.model_runner.reset()
