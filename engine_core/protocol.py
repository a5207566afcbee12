"""Wire structs between the API process and the engine core, and between the engine core and
its workers.

Everything here is a msgspec Struct encoded as msgpack: nothing on a socket is ever pickled.
`array_like=True` encodes structs as arrays (no field names on the wire) and `gc=False` keeps
these short-lived, cycle-free objects out of the garbage collector. This module imports no
torch, so the API process can use it and stay small.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

from metrics.stats import SchedulerStats

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False)


class RequestType(bytes, enum.Enum):
    """First frame of every message the API process sends to the engine core."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


MAX_LOGPROBS = 20
# The widest values the workers' tensors take: token ids and token counts are int32, seeds int64.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Bounded field types: the OpenAI request structs use them too, so the frontend's decoder
# refuses (400) what the engine's would.
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Seed = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
NumLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
LogitBiasValue = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
# A temperature below this samples greedily: SamplingParams makes it exactly 0, so the workers
# and kernels test `temperature == 0` and never divide by a temperature that small.
GREEDY_TEMPERATURE = 1e-5


# A grammar of n choices takes the grammar library time linear in n to build (16 s for
# 100,000 on a 2-core machine), in the frontend's tokenizer pool and again in the engine's
# grammar thread; this many take about 0.2 s.
MAX_CHOICES = 1024
Choices = Annotated[list[str], msgspec.Meta(max_length=MAX_CHOICES)]


class StructuredOutputsParams(msgspec.Struct, **_STRUCT):
    """A constraint on a request's output, enforced by a grammar during sampling (vLLM's
    `structured_outputs`). Exactly one field is set."""

    json: str | None = None  # a JSON schema, serialized
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: Choices | None = None  # exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF) or Lark

    @property
    def kind(self) -> str:
        """The field that is set, as error messages name it."""
        return next((name for name in self.__struct_fields__ if getattr(self, name)), "structured_outputs")

    def validate(self) -> None:
        """Raise ValueError unless exactly one constraint is set and it is not empty (the
        grammar itself is checked by engine_core.grammar, which knows the tokenizer)."""
        fields = [name for name in self.__struct_fields__ if getattr(self, name) not in (None, False)]
        if len(fields) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, "
                             f"grammar; got {fields or 'none'}")
        if self.choice is not None:
            check_arg(bool(self.choice) and all(self.choice), "choice", self.choice,
                      "a non-empty list of non-empty strings")
            check_arg(len(self.choice) <= MAX_CHOICES, "choice", f"a list of {len(self.choice)} strings",
                      f"at most {MAX_CHOICES} strings")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            check_arg(value is None or bool(value.strip()), name, value, "a non-empty string")


class SamplingParams(msgspec.Struct, **_STRUCT):
    """Per-request sampling and stopping controls, as in vLLM (OpenAI's plus vLLM's extras).

    `n` and stop strings are not here: the frontend fans `n` out into child requests and
    matches stop strings after detokenization.

    msgspec enforces the field bounds when it decodes, so the engine never takes a value its
    tensors cannot hold; but the engine drops a message it cannot decode (the request would
    hang), so whoever builds SamplingParams in Python (the frontend, `LLM`) calls `validate`,
    which checks everything, those bounds included, before the engine sees it.
    """

    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1  # -1 (or 0) disables top-k; so does any k >= the vocabulary size
    min_p: MinP = 0.0
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    logit_bias: dict[TokenId, LogitBiasValue] | None = None
    max_tokens: MaxTokens | None = 16  # None: up to max_model_len
    min_tokens: TokenCount = 0
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    logprobs: NumLogprobs | None = None  # number of top alternatives besides the sampled token
    prompt_logprobs: NumLogprobs | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # msgspec runs this on construction, on `msgspec.structs.replace` and on decoding, so
        # the workers only ever see a greedy temperature as 0. Negative or non-finite values
        # are left for `validate` to refuse.
        if 0.0 < self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling counts the request's own tokens (presence, frequency, repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def has_logits_processors(self) -> bool:
        """Whether sampling edits the logits: penalties, logit bias, or min_tokens' ban of the
        stop tokens. Such a request never speculates: penalties and the ban shift with every
        draft before a position, and draft verification applies no processor."""
        return bool(self.has_penalties or self.logit_bias or self.min_tokens)

    def stop_ids(self, eos_token_ids: Iterable[int]) -> frozenset[int]:
        """The token ids that end the request: its stop tokens, and EOS unless ignore_eos."""
        if self.ignore_eos:
            return frozenset(self.stop_token_ids)
        return frozenset(self.stop_token_ids).union(eos_token_ids)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field, its value and the allowed range."""
        check_arg(math.isfinite(self.temperature) and self.temperature >= 0.0,
                  "temperature", self.temperature, "a finite number >= 0")
        check_arg(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "(0, 1]")
        check_arg(-1 <= self.top_k <= INT32_MAX, "top_k", self.top_k, f"in [-1, {INT32_MAX}] (-1 or 0: disabled)")
        check_arg(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "[0, 1]")
        check_arg(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "[-2, 2]")
        check_arg(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "[-2, 2]")
        check_arg(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0,
                  "repetition_penalty", self.repetition_penalty, "a finite number > 0")
        if self.max_tokens is not None:
            check_arg(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
            check_arg(self.max_tokens <= INT32_MAX, "max_tokens", self.max_tokens, f"<= {INT32_MAX}")
        check_arg(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        max_min_tokens = INT32_MAX if self.max_tokens is None else self.max_tokens
        check_arg(self.min_tokens <= max_min_tokens, "min_tokens", self.min_tokens,
                  f"<= {INT32_MAX}" if self.max_tokens is None else f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check_arg(0 <= value <= MAX_LOGPROBS, name, value, f"[0, {MAX_LOGPROBS}]")
        if self.seed is not None:
            check_arg(INT64_MIN <= self.seed <= INT64_MAX, "seed", self.seed, f"in [{INT64_MIN}, {INT64_MAX}]")
        # Without the vocabulary size, token ids are held to what the workers' int32 tensors take.
        num_ids = INT32_MAX + 1 if vocab_size is None else vocab_size
        for token_id in self.stop_token_ids:
            check_arg(0 <= token_id < num_ids, "stop_token_ids", token_id, f"token ids in [0, {num_ids})")
        for token_id, bias in (self.logit_bias or {}).items():
            check_arg(0 <= token_id < num_ids, "logit_bias", token_id, f"token ids in [0, {num_ids})")
            check_arg(-100.0 <= bias <= 100.0, "logit_bias", bias, "biases in [-100, 100]")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()


def check_arg(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class EngineCoreRequest(msgspec.Struct, **_STRUCT):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0  # wall clock; the frontend times the request's latencies from it


class Logprobs(msgspec.Struct, **_STRUCT):
    """Logprobs of consecutive positions. Row i holds the token actually at that position
    first, then the top-k alternatives; `ranks[i]` is the rank of that token (1 = argmax)."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class EngineCoreOutput(msgspec.Struct, **_STRUCT):
    """What happened to one request in one step: only the delta since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None  # once, with the first output; row 0 is the 2nd prompt token
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that finished the request
    num_cached_tokens: int = 0
    error: str | None = None  # with finish_reason ERROR
    # With `error`: the engine failed to run the request (its fault, a 500), rather than
    # refusing the request's values (the client's, a 400).
    error_is_internal: bool = False
    # When the request was first scheduled (wall clock); with its first output only. The
    # frontend times everything else itself; this splits queue time from prefill time.
    scheduled_time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, **_STRUCT):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
    # Set on the last message of a dying engine core; the frontend fails every request.
    engine_dead: str | None = None
    # Answer to a UtilityRequest, matched by call_id.
    utility_output: UtilityOutput | None = None


class UtilityRequest(msgspec.Struct, **_STRUCT):
    """A small RPC to the engine core: `method` is one of EngineCore's utility methods."""

    call_id: int
    method: str
    args: list[msgspec.Raw] = []


class UtilityOutput(msgspec.Struct, **_STRUCT):
    call_id: int
    # The method's return value (any msgspec-encodable object). Not `msgspec.Raw | None`:
    # msgspec cannot decode Raw inside a union.
    result: Any = None
    error: str | None = None


class EngineReady(msgspec.Struct, tag=True, **_STRUCT):
    """The engine core's handshake: sent once its model and KV cache are ready."""

    model_path: str  # resolved local directory: the frontend loads the tokenizer from it
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    kv_capacity_tokens: int
    max_concurrency: float  # requests of max_model_len tokens that fit in the KV cache
    max_num_seqs: int  # the config's, or the device's default
    max_num_batched_tokens: int
    device: str
    dtype: str
    eos_token_ids: list[int]


class EngineStartFailure(msgspec.Struct, tag=True, **_STRUCT):
    """The handshake of an engine core that cannot start because of its configuration or its
    model (a ValueError naming the value): the user's to fix, said in one line."""

    reason: str


def now() -> float:
    return time.time()


# Engine core <-> workers. The executor hands these to the worker in-process, or sends them
# to worker processes; either way they are plain structs.


class ModelInfo(msgspec.Struct, **_STRUCT):
    """What the engine core needs to know about a worker's loaded model and KV cache."""

    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    max_num_seqs: int  # the config's, or the device's default
    max_num_batched_tokens: int
    device: str
    dtype: str


class NewRequestData(msgspec.Struct, **_STRUCT):
    """A request the workers have not seen, or one resumed after preemption (then
    `token_ids` holds its outputs so far too, and the workers recompute them)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, **_STRUCT):
    """Requests the workers already hold, parallel lists."""

    request_ids: list[str] = []
    new_block_ids: list[list[int]] = []  # blocks appended this step
    num_computed_tokens: list[int] = []


class SchedulerOutput(msgspec.Struct, **_STRUCT):
    # request_id -> tokens to run this step; its order is the batch order.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    new_requests: list[NewRequestData] = []
    cached_requests: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    # Requests the workers must forget: finished, aborted, or preempted since the last step.
    finished_request_ids: list[str] = []
    # Speculative decoding: each request's draft tokens, scheduled right after its last known
    # token (its num_scheduled_tokens count them), and whether to propose drafts after this step.
    scheduled_spec_token_ids: dict[str, list[int]] = {}
    propose_drafts: bool = False
    # Structured outputs: the requests that sample under a grammar this step. Their masks
    # follow in a message of their own (WorkerCommand.SAMPLE), made while the forward runs.
    grammar_request_ids: list[str] = []


class ModelRunnerOutput(msgspec.Struct, **_STRUCT):
    # Requests that sampled this step (those whose prefill is complete), in batch order; each
    # gets its accepted draft tokens and one more (a single token without drafts).
    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    # Drafts proposed for each request's next step (speculative decoding).
    draft_token_ids: dict[str, list[int]] = {}
    logprobs: dict[str, Logprobs] = {}
    prompt_logprobs: dict[str, Logprobs] = {}  # chunks of prompt logprobs computed this step


class WorkerCommand(bytes, enum.Enum):
    """First frame of every message the executor sends to a worker process (the payload of
    LAUNCH is a SchedulerOutput, that of SAMPLE packed grammar masks; the others have none)."""

    LAUNCH = b"\x00"  # enqueue a step
    COLLECT = b"\x01"  # finish the oldest step launched, and reply
    RESET = b"\x02"  # drop every request and step, after a failed step
    SAMPLE = b"\x03"  # the grammar masks of the step launched last (the payload): sample it


class WorkerReply(msgspec.Struct, **_STRUCT):
    """A worker process's answer: its ModelInfo once loaded, then one per COLLECT (rank 0's
    carrying the step's output), or the error that stopped it."""

    rank: int
    info: ModelInfo | None = None
    output: ModelRunnerOutput | None = None
    error: str | None = None
    # False: a ValueError naming a bad value (the configuration, the model, a request);
    # True: anything else, a bug or a broken device.
    error_is_internal: bool = False
