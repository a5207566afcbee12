"""OpenAI request and response bodies as msgspec structs, plus vLLM's sampling extras.

Request bodies are decoded straight into these structs: a wrong type, a missing field or a
number out of its `msgspec.Meta` bounds fails the decode with the parameter's JSON path, which
the server turns into a 400. The bounds come from `engine_core.protocol`, the one place they
are stated, or are OpenAI's own (n, temperature's ceiling). What they cannot express (the
vocabulary size, one field against another) is checked by `check`, and by
`SamplingParams.validate` when `sampling_params` builds the engine's struct: a check that struct
already makes (temperature's floor, repetition_penalty > 0) is left to it, not stated here again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from engine_core.protocol import (
    Choices,
    LogitBiasValue,
    MaxTokens,
    MinP,
    NumLogprobs,
    Penalty,
    SamplingParams,
    Seed,
    StructuredOutputsParams,
    TokenCount,
    TokenId,
    TopK,
    TopP,
)
from frontend.errors import from_value_error, invalid_param

MAX_N = 128  # OpenAI's limit on `n`
# Prompts in one completions request. The admission bound on prompts x n usually refuses fewer;
# this one holds however large --max-waiting-requests makes that.
MAX_PROMPTS = 2048
MAX_REQUEST_TIMEOUT_S = 86400.0  # a day: a bound that keeps the deadline arithmetic finite
NumChoices = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
# OpenAI's ceiling; SamplingParams.validate refuses what is below 0.
Temperature = Annotated[float, msgspec.Meta(le=2.0)]


# ---------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text of an object


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None


class FunctionDefinition(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None


class ChatTool(msgspec.Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class ToolChoiceFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: ToolChoiceFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Fields that chat and text completions share."""

    model: str | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[TokenId, LogitBiasValue] | None = None
    max_tokens: MaxTokens | None = None
    n: NumChoices = 1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None
    # vLLM's extras
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: float | None = None  # > 0: SamplingParams.validate
    ignore_eos: bool = False
    min_tokens: TokenCount = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older
    # guided_* fields; at most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    # Octavo's: seconds this request may run (overrides --request-timeout); past it, a 408.
    request_timeout: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_REQUEST_TIMEOUT_S)] | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise invalid_param("stream_options", "stream_options is only allowed when stream is true")

    def structured_outputs_params(self) -> tuple[str, StructuredOutputsParams] | None:
        """The request's output constraint and the parameter that set it, if any; a 400
        when several are set or one is malformed (its grammar is checked later, with the
        tokenizer: frontend.tokenizer.check_grammar)."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", self._response_format_params(self.response_format)))
        so = self.structured_outputs
        if so is not None:
            found.append(("structured_outputs", StructuredOutputsParams(
                json=_schema_text(so.json), json_object=so.json_object, regex=so.regex, choice=so.choice,
                grammar=so.grammar)))
        guided = {"guided_json": StructuredOutputsParams(json=_schema_text(self.guided_json)),
                  "guided_regex": StructuredOutputsParams(regex=self.guided_regex),
                  "guided_choice": StructuredOutputsParams(choice=self.guided_choice),
                  "guided_grammar": StructuredOutputsParams(grammar=self.guided_grammar)}
        found += [(name, params) for name, params in guided.items() if getattr(self, name) is not None]
        if not found:
            return None
        if len(found) > 1:
            raise invalid_param(found[1][0], f"{found[0][0]} and {found[1][0]} both constrain the output: "
                                "set only one")
        param, params = found[0]
        try:
            params.validate()
        except ValueError as e:
            raise invalid_param(param, f"{param}: {e}") from None
        return param, params

    @staticmethod
    def _response_format_params(response_format: ResponseFormat) -> StructuredOutputsParams:
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if response_format.json_schema is None or response_format.json_schema.schema is None:
            raise invalid_param("response_format", "response_format of type json_schema needs "
                                "json_schema.schema, the JSON schema of the output")
        return StructuredOutputsParams(json=_schema_text(response_format.json_schema.schema))

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None, vocab_size: int,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """The engine's struct for this request, validated: a 400 naming the field, its value
        and the allowed range for whatever the engine would refuse."""
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
        )
        try:
            params.validate(vocab_size)
        except ValueError as e:
            raise from_value_error(e) from None
        return params


def _schema_text(schema: str | dict[str, Any] | None) -> str | None:
    return schema if schema is None or isinstance(schema, str) else msgspec.json.encode(schema).decode()


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's limit: a forced choice builds a grammar over every tool's schema.
    tools: Annotated[list[ChatTool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True

    def check(self, trust_request_chat_template: bool) -> None:
        self.check_common()
        if not self.messages:
            raise invalid_param("messages", "messages must contain at least one message")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")
        # A Jinja template is code: one from a client could loop for minutes, so it runs only
        # where the operator trusts every client (vLLM's flag of the same name).
        if "chat_template" in (self.chat_template_kwargs or {}) and not trust_request_chat_template:
            raise invalid_param("chat_template_kwargs", "chat_template_kwargs.chat_template: this server does "
                                "not run a chat template sent by the client; start it with "
                                "--trust-request-chat-template to allow that")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """The completion budget and the name it was given under (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


PromptInput = str | list[str | TokenId | list[TokenId]]
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: PromptInput
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: NumLogprobs | None = None
    best_of: NumChoices | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_param("best_of", "best_of is not supported (only best_of == n)")
        if self.suffix is not None:
            raise invalid_param("suffix", "suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or token ids; cheap, so it runs before any tokenization."""
        items = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if items and all(isinstance(p, int) for p in items):
            return [items]  # a single prompt given as token ids
        if any(isinstance(p, int) for p in items):
            raise invalid_param("prompt", f"prompt must be {_PROMPT_SHAPES}")
        if not items or not all(items):
            raise invalid_param("prompt", "prompt must not be empty")
        if len(items) > MAX_PROMPTS:
            raise invalid_param("prompt", f"prompt must be a list of at most {MAX_PROMPTS} prompts, "
                                f"got {len(items)}")
        return items


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[TokenId]
    model: str | None = None


# ---------------------------------------------------------------- responses


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None  # vLLM's: the stop string or token that ended it


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True):
    """A streamed piece of a call: the first carries id, type and name, later ones only
    argument fragments (OpenAI's shape)."""

    index: int
    function: DeltaFunctionCall
    id: str | None = None
    type: Literal["function"] | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class CompletionLogprobs(msgspec.Struct):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: str = "model"
    owned_by: str = "octavo"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
