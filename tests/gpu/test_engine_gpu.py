"""Whole-model and whole-engine checks on a GPU against transformers on the same weights.

    python -m pytest tests/gpu -q          (skipped on a machine without CUDA)

- Logits of a mixed batch (prefill chunks over cached prefixes plus decodes), through the
  Triton kernels: relative error ||a - b|| / ||b|| <= 1e-3 in float32, <= 2e-2 in bfloat16,
  against transformers in float32 on the same (bf16-rounded) weights. transformers' own
  bfloat16 run is printed beside it (it is ~2.6e-2 away, mostly from rounding its rotary
  frequencies to bfloat16, which Octavo keeps in float32).
- Greedy generation of the tiny test configs, eager and with CUDA graphs, identical to
  transformers in float32. With graphs, every step (prompt chunks and mixed batches too)
  replays one: the model's Python forward never runs after start-up.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers
from tests.gpu.paged_steps import SEQUENCE_LENGTHS, STEPS, mixed_batch_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 1000


def qwen3_shape(num_layers: int = 4):
    return transformers.Qwen3Config(hidden_size=1024, num_hidden_layers=num_layers, num_attention_heads=16,
                                    num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                    vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096)


def llama_shape(num_layers: int = 4):
    return transformers.LlamaConfig(hidden_size=512, num_hidden_layers=num_layers, num_attention_heads=8,
                                    num_key_value_heads=2, intermediate_size=1024, vocab_size=VOCAB,
                                    max_position_embeddings=4096)


CONFIGS = {"qwen3": qwen3_shape, "llama-gqa4-hd64": llama_shape}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
@torch.inference_mode()
def test_mixed_batch_logits(checkpoint, dtype, bound):
    from workers.model_loader import load_model

    hf_cpu, path = checkpoint
    # The float32 reference runs the weights as rounded to `dtype`, so only the arithmetic
    # differs. Only parameters are rounded: `.to(bfloat16)` would also round the rotary
    # inverse frequencies, a positional error of the reference's own.
    hf_same_dtype = copy.deepcopy(hf_cpu).to("cuda", dtype)
    hf = copy.deepcopy(hf_cpu).to("cuda")
    for param in hf.parameters():
        param.data = param.data.to(dtype).float()
    ours = load_model(path, dtype, torch.device("cuda"))
    rng = random.Random(0)
    seqs = [[rng.randrange(VOCAB) for _ in range(n)] for n in SEQUENCE_LENGTHS]
    logits, starts = mixed_batch_logits(ours, seqs, dtype, torch.device("cuda"))
    for i, (start, end) in enumerate(STEPS[1][:3]):
        tokens = torch.tensor([seqs[i][:end]], device="cuda")
        ref = hf(tokens).logits[0, start:end]
        err = rel_error(logits[starts[i]:starts[i + 1]], ref)
        print(f"{dtype} request {i}: octavo {err:.2e}, transformers in the same dtype "
              f"{rel_error(hf_same_dtype(tokens).logits[0, start:end], ref):.2e}")
        assert err <= bound, f"request {i}: relative logits error {err:.2e} > {bound:.0e}"


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_greedy_generation_matches_transformers_fp32(checkpoint, enforce_eager):
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    hf_cpu, path = checkpoint
    hf = copy.deepcopy(hf_cpu).to("cuda")
    llm = LLM(str(path), dtype="float32", max_model_len=1024, max_num_batched_tokens=256,
              enforce_eager=enforce_eager, max_num_seqs=16,
              kv_cache_memory=1 << 30)  # several engines share the GPU in one test session
    eager_forwards = []
    llm.engine.executor.worker.model.register_forward_pre_hook(lambda *args: eager_forwards.append(1))
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 300))] for _ in range(12)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    # Every step is within the 256-token budget, so each replays a graph unless enforce_eager.
    assert (len(eager_forwards) > 0) == enforce_eager
    mismatches = 0
    for prompt, out in zip(prompts, outputs):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False)
        mismatches += out.token_ids != ref[0, len(prompt):].tolist()
    assert mismatches == 0
