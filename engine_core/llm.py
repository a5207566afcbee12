"""LLM: the offline entry point. It drives the same EngineCore in-process.

    llm = LLM()                       # the embedded default model
    out = llm.generate("Hello", SamplingParams(max_tokens=32, temperature=0))
    print(out[0].text)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from engine_core.config import EngineConfig, SpeculativeConfig
from engine_core.engine import EngineCore
from engine_core.protocol import EngineCoreOutput, EngineCoreRequest, Logprobs, SamplingParams

Prompt = str | list[int]
ChatMessages = list[dict[str, str]]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | None = None
    error: str | None = None
    # One dict per generated token: the sampled token first, then the top alternatives.
    logprobs: list[dict[int, float]] | None = None
    # One dict per prompt token after the first (the first has no context to score it).
    prompt_logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0


def _logprob_dicts(lp: Logprobs) -> list[dict[int, float]]:
    return [dict(zip(ids, values)) for ids, values in zip(lp.token_ids, lp.logprobs)]


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        if engine_args.get("speculative_config") is not None:
            engine_args["speculative_config"] = SpeculativeConfig.parse(engine_args["speculative_config"])
        self.config = EngineConfig(model=model, **engine_args)
        self.engine = EngineCore(self.config)
        # A checkpoint without tokenizer files (e.g. a test's random model) takes token ids only.
        model_path = Path(self.engine.ready.model_path)
        has_tokenizer = any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path) if has_tokenizer else None
        self._request_counter = itertools.count()

    def _to_token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
            if bad is not None:
                raise ValueError(f"token ids must be integers, got {bad!r}")
            return prompt
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_id_lists = [self._to_token_ids(p) for p in prompts]
        return self._run(token_id_lists, sampling_params, use_tqdm)

    def chat(self, messages: ChatMessages | list[ChatMessages],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (and so no chat template)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_id_lists = [
            list(self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
            for c in conversations
        ]
        return self._run(token_id_lists, sampling_params, use_tqdm)

    def _run(self, token_id_lists: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        requests = self._make_requests(token_id_lists, sampling_params)
        # Every request is checked before any is queued: bad input fails before any work.
        for request in requests:
            self.engine.validate_request(request)
        results = {r.request_id: RequestOutput(r.request_id, r.prompt_token_ids) for r in requests}
        for request in requests:
            self.engine.add_request(request)

        progress = tqdm(total=len(requests), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step().outputs:
                _add_output(results[out.request_id], out)
                if out.finished:
                    progress.update(1)
        progress.close()
        if self.tokenizer is not None:
            for result in results.values():
                result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return list(results.values())

    def _make_requests(self, token_id_lists: list[list[int]],
                       sampling_params: SamplingParams | list[SamplingParams] | None) -> list[EngineCoreRequest]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(token_id_lists)
        if len(sampling_params) != len(token_id_lists):
            raise ValueError(f"sampling_params must be one or one per prompt ({len(token_id_lists)}), "
                             f"got {len(sampling_params)}")
        return [
            EngineCoreRequest(request_id=str(next(self._request_counter)), prompt_token_ids=ids,
                              sampling_params=params)
            for ids, params in zip(token_id_lists, sampling_params)
        ]


def _add_output(result: RequestOutput, out: EngineCoreOutput) -> None:
    """Fold one step's delta for a request into its result."""
    result.token_ids.extend(out.new_token_ids)
    result.num_cached_tokens = out.num_cached_tokens
    if out.new_logprobs is not None:
        if result.logprobs is None:
            result.logprobs = []
        result.logprobs.extend(_logprob_dicts(out.new_logprobs))
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = _logprob_dicts(out.prompt_logprobs)
    if out.finished:
        result.finish_reason = str(out.finish_reason)
        result.stop_reason = out.stop_reason
        result.error = out.error
