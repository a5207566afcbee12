"""What every handler reads: the engine, the tokenizer, the model's limits and the server's settings."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engine_core.protocol import EngineReady
from frontend.admission import AdmissionLimit
from frontend.engine_client import EngineClient
from frontend.engine_supervisor import EngineSupervisor
from frontend.errors import APIError
from frontend.tokenizer import ModelTokenizer
from frontend.tool_calling import ToolCallingConfig


@dataclass(frozen=True)
class ServerState:
    engine: EngineSupervisor
    tokenizer: ModelTokenizer
    ready: EngineReady  # the engine's handshake: max_model_len, vocab_size, ...
    model_names: list[str]  # the first is the name responses carry by default
    api_key: str | None
    admission: AdmissionLimit
    request_timeout: float | None  # seconds; a request's own `request_timeout` overrides it
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # set at SIGTERM: admit nothing new
    trust_request_chat_template: bool = False  # run a chat template sent in chat_template_kwargs
    tool_calling: ToolCallingConfig = ToolCallingConfig()  # --enable-auto-tool-choice, --tool-call-parser

    @property
    def client(self) -> EngineClient:
        """The engine now serving (after a restart, the new one)."""
        return self.engine.client

    def check_model(self, model: str | None) -> str:
        """The model name the response carries; 404 for a name this server does not serve."""
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model
