"""One HTTP request's generation: its prompts fanned out into one engine request per choice,
admitted against the overload bound, their deltas awaited until each choice finishes."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec

from engine_core.protocol import INT64_MIN, EngineCoreRequest, SamplingParams
from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.errors import request_timed_out, shutting_down
from frontend.openai_protocol import GenerationRequest
from frontend.output_processor import ChoiceDelta, RequestOutputCollector, RequestState
from frontend.server_state import ServerState


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    # As vLLM: with a seed, choice i samples with seed + i, so n > 1 gives n different
    # samples and the whole response stays reproducible. The sum wraps around within 64 bits,
    # the seed's bounds on the wire.
    if params.seed is None or index == 0:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + index - INT64_MIN) % 2**64 + INT64_MIN)


class Generation:
    """The engine requests behind one HTTP request, one per choice, sharing one collector:
    `body.n` choices for each prompt, prompt by prompt, so choice i answers prompt i // n.
    Admitted (or refused with 503) on creation; whoever creates it must `close()` it. Past its
    timeout (the request's own, else the server's) it raises a 408 and `close()` aborts it,
    freeing its KV cache."""

    def __init__(self, state: ServerState, request_id: str, body: GenerationRequest,
                 prompts: list[list[int]], params: list[SamplingParams]) -> None:
        if state.draining.is_set():
            raise shutting_down("it finishes the requests in progress and admits no new ones")
        self.request_id = request_id
        self.num_choices = len(prompts) * body.n
        self.client = state.client
        self.timeout = state.request_timeout if body.request_timeout is None else body.request_timeout
        self.deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout
        self.collector = RequestOutputCollector()
        self.unfinished: dict[int, str] = {}  # choice index -> engine request id
        self.admission = state.admission
        self.admission.acquire(self.num_choices)
        self.num_admitted = self.num_choices
        try:
            self._add_requests(state, body, prompts, params)
        except BaseException:  # the engine died mid-way: nobody gets to close() this
            self.close()
            raise

    def _add_requests(self, state: ServerState, body: GenerationRequest, prompts: list[list[int]],
                      params: list[SamplingParams]) -> None:
        arrival = time.time()
        stop = body.stop_strings()
        for prompt_index, (prompt, prompt_params) in enumerate(zip(prompts, params)):
            for i in range(body.n):
                index = prompt_index * body.n + i
                child_id = f"{self.request_id}-{index}"
                detokenizer = IncrementalDetokenizer(state.tokenizer.fast, prompt, body.skip_special_tokens)
                matcher = StopStringMatcher(stop, body.include_stop_str_in_output) if stop else None
                request_state = RequestState(child_id, index, self.collector, detokenizer, matcher,
                                             body.include_stop_str_in_output)
                self.unfinished[index] = child_id
                request = EngineCoreRequest(child_id, prompt, child_params(prompt_params, i), arrival)
                self.client.add_request(request, request_state)

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def next(self) -> dict[int, ChoiceDelta]:
        """The deltas since the last call, by choice index; waits for at least one."""
        if self.deadline is None:
            deltas = await self.collector.get()
        else:
            try:
                deltas = await asyncio.wait_for(self.collector.get(),
                                                self.deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise request_timed_out(self.timeout) from None
        for index, delta in deltas.items():
            if delta.finished:
                self.unfinished.pop(index, None)
        return deltas

    async def collect(self) -> dict[int, ChoiceDelta]:
        """Everything, for a non-streaming response; raises the first choice's error."""
        total: dict[int, ChoiceDelta] = {}
        while not self.done:
            for index, delta in (await self.next()).items():
                if delta.error is not None:
                    raise delta.error
                if index in total:
                    total[index].merge(delta)
                else:
                    total[index] = delta
        return total

    def close(self) -> None:
        """Abort what is still running (the client went away or the response failed) and
        leave the admitted set; idempotent."""
        if self.unfinished:
            self.client.abort(list(self.unfinished.values()))
            self.unfinished.clear()
        self.admission.release(self.num_admitted)
        self.num_admitted = 0
