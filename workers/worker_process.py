"""One tensor-parallel rank's process: a Worker driven by the engine core's executor.

The executor starts it as `python -m workers.worker_process RANK COMMAND_ADDR REPLY_ADDR
INIT_METHOD` and writes the EngineConfig as one JSON line to its stdin. Stdin then stays open
as a lifeline: its end (the engine core exited, however it died) ends this process at once,
even from inside a collective that will never complete, so no rank outlives its engine.

The executor sends every rank the same commands, each a type frame and a payload:
- LAUNCH + SchedulerOutput: enqueue the step on this rank's shards of the model.
- SAMPLE + grammar masks: finish sampling the step just launched (structured outputs).
- COLLECT: finish the oldest step and reply. Every rank samples the same tokens (the logits
  are gathered whole on every rank, and seeds are the same), so each rank's batch stays in
  step with no broadcast of the tokens; rank 0's reply carries the ModelRunnerOutput.
- RESET: drop every request and step in flight, after a failed step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import msgspec
import numpy as np
import zmq

from engine_core.config import EngineConfig
from engine_core.protocol import SchedulerOutput, WorkerCommand, WorkerReply
from workers.worker import Worker

logger = logging.getLogger(__name__)


def _watch_lifeline(fd: int) -> None:
    while os.read(fd, 4096):
        pass
    os._exit(0)  # a rank may be blocked in a collective that its dead peers never join


def serve(worker: Worker, rank: int, commands: zmq.Socket, replies: zmq.Socket) -> None:
    """Run commands until the lifeline ends the process. A failed launch is reported at the
    step's COLLECT, where the in-process executor would have raised it."""
    decoder = msgspec.msgpack.Decoder(SchedulerOutput)
    encoder = msgspec.msgpack.Encoder()
    failed_launch: str | None = None
    while True:
        kind, payload = commands.recv_multipart(copy=False)
        command = WorkerCommand(kind.bytes)
        if command is WorkerCommand.RESET:
            failed_launch = None
            worker.reset()  # raising here means a broken device: the process ends
        elif command in (WorkerCommand.LAUNCH, WorkerCommand.SAMPLE):
            try:
                if failed_launch is None and command is WorkerCommand.LAUNCH:
                    worker.launch(decoder.decode(payload.buffer))
                elif failed_launch is None:
                    worker.sample_under_grammar(np.frombuffer(payload.buffer, np.int32))
            except Exception as e:
                logger.exception("rank %d failed to launch a step", rank)
                failed_launch = f"{type(e).__name__}: {e}"
        else:
            reply = WorkerReply(rank=rank, error=failed_launch)
            if failed_launch is None:
                try:
                    output = worker.collect()
                    if rank == 0:
                        reply.output = output
                except Exception as e:
                    logger.exception("rank %d failed to run a step", rank)
                    reply.error = f"{type(e).__name__}: {e}"
            failed_launch = None
            replies.send(encoder.encode(reply))


def main() -> None:
    rank, command_addr, reply_addr, init_method = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker {rank}: %(message)s")
    config = msgspec.json.decode(sys.stdin.buffer.readline(), type=EngineConfig)
    # The engine core decides when this process ends (the lifeline); a Ctrl-C or SIGTERM sent
    # to the whole process group must not kill a rank under a running engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_lifeline, args=(sys.stdin.fileno(),), name="lifeline", daemon=True).start()
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(command_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.connect(reply_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        worker = Worker(config, rank=rank, init_method=init_method)
    except Exception as e:
        internal = not isinstance(e, ValueError)
        logger.debug("rank %d failed to start", rank, exc_info=True)
        replies.send(encoder.encode(WorkerReply(rank=rank, error=f"{type(e).__name__}: {e}" if internal else str(e),
                                                error_is_internal=internal)))
        replies.close(linger=5000)
        sys.exit(1)
    replies.send(encoder.encode(WorkerReply(rank=rank, info=worker.model_info())))
    serve(worker, rank, commands, replies)


if __name__ == "__main__":
    main()
