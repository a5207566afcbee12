"""The overload bound: how many engine requests the server holds at once."""

from __future__ import annotations

from frontend.errors import invalid_param, overloaded


class AdmissionLimit:
    """Bounds the engine requests admitted but not finished (choices of HTTP requests still
    being served). Past the bound a new request gets 503 at once: overload then costs clients
    a retry, instead of a queue, its memory and everyone's latency growing without bound.
    Requests already admitted are never touched."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = 0

    def check_request_size(self, num_prompts: int, n: int) -> None:
        """Refuse (400) a request that alone needs more engine requests than the bound: no
        retry could ever admit it. Handlers call this before any tokenization."""
        if num_prompts * n > self.limit:
            prompts = f"{num_prompts} prompt{'s' if num_prompts > 1 else ''}"
            raise invalid_param("prompt" if num_prompts > self.limit else "n",
                                f"This request asks for {num_prompts * n} completions ({prompts} x n = {n}), more "
                                f"than the {self.limit} this server serves at once. Send fewer prompts or a smaller "
                                "n per request.")

    def acquire(self, num_requests: int) -> None:
        if self.admitted + num_requests > self.limit:
            raise overloaded(self.limit)
        self.admitted += num_requests

    def release(self, num_requests: int) -> None:
        self.admitted -= num_requests
