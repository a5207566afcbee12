"""The model's tokenizer in the API process: encoding, chat templates, token strings.

Loaded from the directory the engine reports in its handshake, so both sides agree on the
vocabulary. The hot paths (encode, incremental decode) call the Rust `tokenizers.Tokenizer`
directly; transformers is used for what only it does: rendering the Jinja chat template.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from frontend.errors import invalid_param
from frontend.openai_protocol import ChatMessage


def import_transformers() -> None:
    """Importing transformers takes seconds: the server does it while the engine loads."""
    from transformers import AutoTokenizer  # noqa: F401


class ModelTokenizer:
    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(model_path)
        self.fast: Tokenizer = self.hf.backend_tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.fast.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token's own text, as logprobs show it."""
        return self.fast.decode_batch([[t] for t in token_ids], skip_special_tokens=False)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> str:
        conversation = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                        for m in messages]
        if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
            raise invalid_param("continue_final_message", "continue_final_message needs a final assistant "
                                "message and add_generation_prompt false")
        try:
            return self.hf.apply_chat_template(conversation, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message,
                                               **(template_kwargs or {}))
        except Exception as e:  # the template is code run on user input: its failures are 400s
            raise invalid_param("messages", f"the chat template cannot render these messages: {e}") from None

    def chat_token_ids(self, messages: list[ChatMessage], add_generation_prompt: bool,
                       continue_final_message: bool = False,
                       template_kwargs: dict[str, Any] | None = None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, continue_final_message, template_kwargs)
        # The template writes the special tokens (BOS included) itself.
        return self.encode(text, add_special_tokens=False)
