"""A request's output constraint (response_format, structured_outputs, guided_*), checked here
with the model's tokenizer so that a grammar the engine cannot build is a 400 that never
reaches the engine."""

from __future__ import annotations

from engine_core.protocol import StructuredOutputsParams
from frontend.openai_protocol import GenerationRequest
from frontend.server_state import ServerState


async def check_structured_outputs(state: ServerState, body: GenerationRequest) -> StructuredOutputsParams | None:
    found = body.structured_outputs_params()
    if found is None:
        return None
    param, params = found
    await state.tokenizer.check_grammar(param, params, state.ready.vocab_size, state.ready.eos_token_ids)
    return params
