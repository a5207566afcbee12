"""MultiprocExecutor: one worker process per tensor-parallel rank.

The engine core starts the ranks by module path (`workers.worker_process`) and speaks to them
only through wire structs over ZeroMQ: per step the scheduler output is encoded once and the
same bytes are pushed to every rank, and each rank replies once the step is collected. A rank
that dies, or ranks that disagree about whether a step failed, end the engine: its process
exits, the frontend restarts it, and the ranks follow their engine out through their
lifelines.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time

import msgspec
import numpy as np
import zmq

from engine_core.config import EngineConfig
from engine_core.executor import Executor, WorkerFailedError
from engine_core.protocol import ModelInfo, ModelRunnerOutput, SchedulerOutput, WorkerCommand, WorkerReply

logger = logging.getLogger(__name__)

WORKER_PROCESS_MODULE = "workers.worker_process"
_POLL_MS = 100  # how often a wait for replies checks that every rank is alive
# After one rank reports a failed step, how long the others may take to report theirs: a rank
# still silent then is stuck in a collective that the failed rank never joined.
_MIXED_FAILURE_GRACE_S = 10.0


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.world_size = config.tensor_parallel_size
        self.ipc_dir = tempfile.mkdtemp(prefix="octavo-workers-")
        self.ctx = zmq.Context()
        self.commands: list[zmq.Socket] = []
        for rank in range(self.world_size):
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(f"ipc://{self.ipc_dir}/rank{rank}")
            self.commands.append(sock)
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(f"ipc://{self.ipc_dir}/replies")
        self.decoder = msgspec.msgpack.Decoder(WorkerReply)
        self.encoder = msgspec.msgpack.Encoder()
        init_method = f"file://{self.ipc_dir}/rendezvous"
        config_line = msgspec.json.encode(config) + b"\n"
        self.procs: list[subprocess.Popen] = []
        for rank in range(self.world_size):
            proc = subprocess.Popen([sys.executable, "-m", WORKER_PROCESS_MODULE, str(rank),
                                     f"ipc://{self.ipc_dir}/rank{rank}", f"ipc://{self.ipc_dir}/replies",
                                     init_method], stdin=subprocess.PIPE)
            proc.stdin.write(config_line)
            proc.stdin.flush()  # stdin stays open: it is the rank's lifeline
            logger.info("started tensor-parallel rank %d (pid %d)", rank, proc.pid)
            self.procs.append(proc)
        try:
            replies = self._gather()
        except WorkerFailedError:
            self.shutdown()
            raise
        failed = next((r for r in replies if r.error is not None), None)
        if failed is not None:
            self.shutdown()
            if failed.error_is_internal:
                raise RuntimeError(f"tensor-parallel rank {failed.rank} failed to start: {failed.error}")
            raise ValueError(failed.error)
        self.info: ModelInfo = replies[0].info

    def model_info(self) -> ModelInfo:
        return self.info

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self._broadcast(WorkerCommand.LAUNCH, self.encoder.encode(scheduler_output))

    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None:
        self._broadcast(WorkerCommand.SAMPLE, grammar_bitmask.data)

    def collect(self) -> ModelRunnerOutput:
        self._broadcast(WorkerCommand.COLLECT)
        replies = self._gather()
        errors = {reply.error for reply in replies}
        if None in errors and len(errors) > 1:
            raise WorkerFailedError(f"the tensor-parallel ranks disagree about a step: {errors - {None}}")
        if replies[0].error is not None:
            raise RuntimeError(replies[0].error)  # every rank failed alike: the request's fault
        return replies[0].output

    def reset(self) -> None:
        self._broadcast(WorkerCommand.RESET)

    def shutdown(self) -> None:
        for proc in self.procs:
            proc.stdin.close()  # the lifeline: each rank exits at once
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _broadcast(self, command: WorkerCommand, payload: bytes | memoryview = b"") -> None:
        for sock in self.commands:
            sock.send_multipart((command.value, payload), copy=False)

    def _gather(self) -> list[WorkerReply]:
        """One reply from every rank, in rank order; a rank that exits meanwhile, or stays
        silent long after another reported a failure, is a WorkerFailedError."""
        replies: dict[int, WorkerReply] = {}
        first_failure: float | None = None
        while len(replies) < self.world_size:
            if self.replies.poll(_POLL_MS):
                reply = self.decoder.decode(self.replies.recv(copy=False).buffer)
                replies[reply.rank] = reply
                if reply.error is not None and first_failure is None:
                    first_failure = time.monotonic()
                continue
            self._check_alive(replies)
            if first_failure is not None and time.monotonic() - first_failure > _MIXED_FAILURE_GRACE_S:
                silent = sorted(set(range(self.world_size)) - set(replies))
                raise WorkerFailedError(f"ranks {silent} hang after another rank failed a step: "
                                        f"{next(r.error for r in replies.values() if r.error)}")
        return [replies[rank] for rank in range(self.world_size)]

    def _check_alive(self, replies: dict[int, WorkerReply]) -> None:
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None and rank not in replies:
                raise WorkerFailedError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}")
