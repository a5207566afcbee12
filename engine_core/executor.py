"""Executor: runs each step on the workers.

The engine core speaks to its workers only through this interface and the wire structs of
`engine_core.protocol`, and imports nothing from `workers`: the worker class is loaded by
module path (`WORKER_CLASS`), and worker processes are started by module path too
(`multiproc_executor.WORKER_PROCESS_MODULE`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Protocol

import numpy as np

from engine_core.config import EngineConfig
from engine_core.protocol import ModelInfo, ModelRunnerOutput, SchedulerOutput

# The one named place where the engine core reaches `workers` (DESIGN.md): a dotted path,
# so that `workers` may import `engine_core` and never the other way round.
WORKER_CLASS = "workers.worker.Worker"


class WorkerLike(Protocol):
    """What the executor asks of one device's worker."""

    def model_info(self) -> ModelInfo: ...

    def launch(self, scheduler_output: SchedulerOutput) -> None: ...

    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None: ...

    def collect(self) -> ModelRunnerOutput: ...

    def reset(self) -> None: ...


def load_class(path: str) -> type:
    """The class named by a dotted path ("package.module.Class")."""
    module_name, _, class_name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


class Executor(ABC):
    """Launches steps on the workers and collects their outputs, oldest first."""

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        if config.uses_worker_processes:
            from engine_core.multiproc_executor import MultiprocExecutor

            return MultiprocExecutor(config)
        return InProcessExecutor(config)

    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput) -> None: ...

    @abstractmethod
    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None:
        """Finish the last launched step, which samples under grammars, with their masks
        ([rows, ceil(vocab / 32)] int32, as `StructuredOutputManager.bitmask` packs them)."""

    @abstractmethod
    def collect(self) -> ModelRunnerOutput: ...

    @abstractmethod
    def reset(self) -> None:
        """Drop every request and step in flight on the workers, after a step failed."""

    def shutdown(self) -> None:
        """Stop the workers (worker processes also stop by themselves when the engine core
        exits, however it exits)."""


class WorkerFailedError(RuntimeError):
    """A worker process died, or the ranks fell out of step: no request is to blame, and the
    engine cannot go on."""


class InProcessExecutor(Executor):
    """One device: its worker lives in the engine-core process and a step is a function call,
    saving a process hop per step."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker: WorkerLike = load_class(WORKER_CLASS)(config)

    def model_info(self) -> ModelInfo:
        return self.worker.model_info()

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.launch(scheduler_output)

    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None:
        self.worker.sample_under_grammar(grammar_bitmask)

    def collect(self) -> ModelRunnerOutput:
        return self.worker.collect()

    def reset(self) -> None:
        self.worker.reset()
