"""From engine outputs to per-HTTP-request deltas: detokenize, match stop strings, coalesce.

The output loop calls `OutputProcessor.process` once per engine step, for every request at once;
each request's text delta goes into the `RequestOutputCollector` of the HTTP request that owns
it. A collector merges deltas its handler has not taken yet, so a client that reads slowly
costs memory for its own text and never time of the engine or of other clients.
"""

from __future__ import annotations

import asyncio

from engine_core.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason, Logprobs
from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.errors import APIError
from metrics.stats import IterationStats, RequestStats


class ChoiceDelta:
    """What happened to one choice since its handler last looked."""

    __slots__ = ("text_parts", "token_ids", "logprobs", "prompt_logprobs", "finish_reason",
                 "stop_reason", "error", "num_output_tokens")

    def __init__(self, text: str, token_ids: list[int], logprobs: Logprobs | None,
                 prompt_logprobs: Logprobs | None, finish_reason: str | None,
                 stop_reason: str | int | None, error: APIError | None, num_output_tokens: int) -> None:
        self.text_parts = [text] if text else []
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.error = error
        self.num_output_tokens = num_output_tokens  # cumulative

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def merge(self, later: ChoiceDelta) -> None:
        self.text_parts += later.text_parts
        self.token_ids += later.token_ids
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = later.logprobs
            else:
                self.logprobs.token_ids += later.logprobs.token_ids
                self.logprobs.logprobs += later.logprobs.logprobs
                self.logprobs.ranks += later.logprobs.ranks
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason
        self.error = later.error
        self.num_output_tokens = later.num_output_tokens


class RequestOutputCollector:
    """The pending deltas of one HTTP request, by choice index."""

    def __init__(self) -> None:
        self._pending: dict[int, ChoiceDelta] = {}
        self._ready = asyncio.Event()

    def put(self, index: int, delta: ChoiceDelta) -> None:
        pending = self._pending.get(index)
        if pending is None:
            self._pending[index] = delta
        else:
            pending.merge(delta)
        self._ready.set()

    async def get(self) -> dict[int, ChoiceDelta]:
        await self._ready.wait()
        self._ready.clear()
        deltas, self._pending = self._pending, {}
        return deltas


class RequestState:
    """The frontend's side of one engine request (one choice of an HTTP request)."""

    __slots__ = ("request_id", "index", "collector", "detokenizer", "stop_matcher",
                 "hide_stop_token", "num_output_tokens", "stats")
    stats: RequestStats  # set by OutputProcessor.add, from the engine request

    def __init__(self, request_id: str, index: int, collector: RequestOutputCollector,
                 detokenizer: IncrementalDetokenizer, stop_matcher: StopStringMatcher | None,
                 include_stop_str_in_output: bool) -> None:
        self.request_id = request_id
        self.index = index
        self.collector = collector
        self.detokenizer = detokenizer
        self.stop_matcher = stop_matcher
        self.hide_stop_token = not include_stop_str_in_output
        self.num_output_tokens = 0

    def process(self, output: EngineCoreOutput, iteration: IterationStats) -> tuple[bool, bool]:
        """Deliver one engine output; return (finished, stopped by a stop string)."""
        token_ids = output.new_token_ids
        self.num_output_tokens += len(token_ids)
        iteration.update_from_output(self.stats, len(token_ids), output.scheduled_time)
        finish = output.finish_reason
        # As in vLLM, the EOS / stop token that ended the request is not part of its text.
        text_ids = token_ids[:-1] if finish is FinishReason.STOP and self.hide_stop_token else token_ids
        text = self.detokenizer.update(text_ids)
        finish_reason = None if finish is None else str(finish)
        stop_reason: str | int | None = output.stop_reason
        stopped = False
        if self.stop_matcher is not None:
            text, stop = self.stop_matcher.update(text, final=finish is not None)
            if stop is not None:
                finish_reason, stop_reason, stopped = "stop", stop, finish is None
        error = None
        if finish is FinishReason.ERROR:
            error = (APIError(500, output.error or "the engine failed", code="internal_error")
                     if output.error_is_internal else APIError(400, output.error or "the engine rejected the request"))
        self.collector.put(self.index, ChoiceDelta(text, token_ids, output.new_logprobs, output.prompt_logprobs,
                                                   finish_reason, stop_reason, error, self.num_output_tokens))
        if finish_reason is not None:
            iteration.finish(self.stats, finish_reason)
        return finish_reason is not None, stopped

    def fail(self, error: APIError, iteration: IterationStats) -> None:
        iteration.finish(self.stats, "error")
        self.collector.put(self.index, ChoiceDelta("", [], None, None, "error", None, error, self.num_output_tokens))


class OutputProcessor:
    """The in-flight engine requests, by request id."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestState] = {}

    def add(self, state: RequestState, request: EngineCoreRequest) -> None:
        state.stats = RequestStats(request.arrival_time, len(request.prompt_token_ids))
        self.requests[state.request_id] = state

    def abort(self, request_ids: list[str], iteration: IterationStats) -> list[str]:
        """Forget requests; return those that were still in flight (finished as aborted)."""
        in_flight = []
        for request_id in request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                iteration.finish(state.stats, "abort")
                in_flight.append(request_id)
        return in_flight

    def process(self, outputs: list[EngineCoreOutput], iteration: IterationStats) -> list[str]:
        """Deliver one step's outputs; return the requests that stop strings finished, which
        the engine is still running and must abort."""
        to_abort = []
        for output in outputs:
            state = self.requests.get(output.request_id)
            if state is None:  # aborted here already; the engine had not heard yet
                continue
            finished, stopped = state.process(output, iteration)
            if finished:
                del self.requests[output.request_id]
            if stopped:
                to_abort.append(output.request_id)
        return to_abort

    def fail_all(self, error: APIError, iteration: IterationStats) -> None:
        for state in self.requests.values():
            state.fail(error, iteration)
        self.requests.clear()
