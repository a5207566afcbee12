"""The model's tokenizer in the API process: encoding, chat templates, token strings.

Loaded from the directory the engine reports in its handshake, so both sides agree on the
vocabulary. The hot paths (encode, incremental decode) call the Rust `tokenizers.Tokenizer`
directly; transformers is used for what only it does: rendering the Jinja chat template.

Encoding, decoding a whole prompt and rendering a template take time in proportion to the
input (seconds for megabytes), so they run on a thread pool, not the event loop: `/health`
and the streams of other requests carry on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenizers import Tokenizer

from engine_core.grammar import LLTokenizer, check_grammar, load_tokenizer
from engine_core.protocol import StructuredOutputsParams
from frontend.errors import invalid_param
from frontend.openai_protocol import ChatMessage

T = TypeVar("T")
# Threads for tokenizing, which is CPU-bound: a few, so that long inputs cannot take every core
# from the engine and the event loop.
_MAX_THREADS = 4


def import_transformers() -> None:
    """Importing transformers takes seconds: the server does it while the engine loads."""
    from transformers import AutoTokenizer  # noqa: F401


class ModelTokenizer:
    def __init__(self, model_path: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(model_path)
        self.chat_template = chat_template  # --chat-template: in place of the model's own
        self.fast: Tokenizer = self.hf.backend_tokenizer
        # No token covers more bytes of the text than this: a token's string in the vocabulary
        # spells what it covers at least as long (byte-level BPE writes a byte as a character
        # of one or two bytes, SentencePiece a space as the 3-byte "▁", byte fallback a byte as
        # "<0xNN>"). So a text of more than max_model_len times this many bytes cannot fit in
        # the context, and is refused without tokenizing it. (A normalizer that deletes text
        # would break this; the supported models' do not: Qwen's NFC shrinks text by less than
        # byte-level BPE's spelling grows it.)
        self.max_token_bytes = max(len(token.encode()) for token in self.fast.get_vocab(with_added_tokens=True))
        self._executor = ThreadPoolExecutor(min(_MAX_THREADS, os.cpu_count() or 1), thread_name_prefix="tokenizer")
        self.model_path = model_path
        self._grammar_tokenizer: LLTokenizer | None = None  # llguidance's, built by the first grammar

    async def check_grammar(self, param: str, params: StructuredOutputsParams, vocab_size: int,
                            eos_token_ids: list[int]) -> None:
        """A 400 naming `param` and the problem unless the engine can build the constraint's
        grammar (a JSON schema's unsupported keyword included). Off the event loop: a large
        schema takes a while."""
        try:
            await self._off_loop(self._check_grammar, params, vocab_size, eos_token_ids)
        except ValueError as e:
            raise invalid_param(param, f"{param} cannot be enforced: {e}") from None

    def _check_grammar(self, params: StructuredOutputsParams, vocab_size: int, eos_token_ids: list[int]) -> None:
        if self._grammar_tokenizer is None:  # two threads may both build it: either result does
            self._grammar_tokenizer = load_tokenizer(self.model_path, vocab_size, eos_token_ids)
        check_grammar(params, self._grammar_tokenizer)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._off_loop(self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch, unlike encode, lets go of the GIL while it works, so the event loop
        # runs meanwhile.
        return self.fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._off_loop(self._decode, token_ids, skip_special_tokens)

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return self.fast.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0]

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token's own text, as logprobs show it."""
        return self.fast.decode_batch([[t] for t in token_ids], skip_special_tokens=False)

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                          tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as the chat template writes it, special tokens (BOS included) and all."""
        return await self._off_loop(self._render_chat, messages, add_generation_prompt, continue_final_message,
                                    template_kwargs, tools)

    def _render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
                     template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> str:
        conversation = [_template_message(m, i) for i, m in enumerate(messages)]
        if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
            raise invalid_param("continue_final_message", "continue_final_message needs a final assistant "
                                "message and add_generation_prompt false")
        kwargs: dict[str, Any] = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        kwargs |= template_kwargs or {}
        if tools is not None:  # the request's `tools` field wins over chat_template_kwargs.tools
            kwargs["tools"] = tools
        try:
            return self.hf.apply_chat_template(conversation, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, **kwargs)
        except Exception as e:  # the template is code run on user input: its failures are 400s
            raise invalid_param("messages", f"the chat template cannot render these messages: {e}") from None


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it: an assistant's calls with their
    arguments as an object (templates write them with `tojson`), a tool result with its call's id."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            param = f"messages[{index}].tool_calls[{j}].function.arguments"
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError as e:
                raise invalid_param(param, f"{param} must be JSON text of an object: {e}") from None
            if not isinstance(arguments, dict):
                raise invalid_param(param, f"{param} must be JSON text of an object, got {call.function.arguments!r}")
            calls.append({"id": call.id, "type": call.type,
                          "function": {"name": call.function.name, "arguments": arguments}})
        rendered["tool_calls"] = calls
    return rendered
