"""Mixture of experts on a GPU, at the Qwen3-30B-A3B shape (hidden 2048, 32/4 heads of 128,
128 experts of width 768, top-8, vocabulary 151,936) with random weights.

    python -m pytest tests/gpu/test_moe_gpu.py -q -s      (-s prints the error table)

- The Triton fused MoE against its torch reference in bfloat16 at decode and prefill token
  counts (each tile set), and replayed from a CUDA graph (no host sync inside) with new inputs.
- Logits of a mixed batch (prefill chunks over cached prefixes plus a decode) in bfloat16
  against transformers in float32 on the same bf16-rounded weights, with NUM_LAYERS of the 48
  layers (the whole model in float32 twice over would not fit beside ours, and the layers
  are alike); transformers' own bfloat16 error is printed and bounds ours.
- Greedy tokens with CUDA graphs equal eager ones (float32).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers
from tests.gpu.paged_steps import paged_step_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_LAYERS = 4
A3B = dict(vocab_size=151936, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
           intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
           norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def moe_inputs(num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden, inter, experts, top_k = 2048, 768, 128, 8
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter ** 0.5).bfloat16()
    logits = torch.randn(num_tokens, experts, device="cuda", generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 256, 1024, 4096])
@torch.inference_mode()
def test_fused_moe_kernel_matches_reference(num_tokens):
    from kernels import moe_reference, triton_moe

    args = moe_inputs(num_tokens)
    err = rel_error(triton_moe.fused_moe(*args), moe_reference.fused_moe(*args))
    print(f"fused_moe {num_tokens} tokens ({triton_moe.block_config(num_tokens, 8, 128)}): {err:.2e}")
    assert err <= 1e-2


@torch.inference_mode()
def test_fused_moe_replays_from_a_cuda_graph():
    from kernels import ops

    args = list(moe_inputs(64))
    ops.fused_moe(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fused_moe(*args)
    fresh = moe_inputs(64, seed=1)
    for static, new in zip(args, fresh):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, ops.fused_moe(*fresh), rtol=0, atol=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The NUM_LAYERS-layer A3B shape with transformers' random init, saved in bfloat16; the
    float32 model holding those same bf16-rounded weights."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**A3B, num_hidden_layers=NUM_LAYERS)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("a3b")
    model.save_pretrained(path)
    return model.float(), path


@torch.inference_mode()
def test_mixed_batch_logits_bfloat16(checkpoint):
    from workers.model_loader import load_model

    hf, path = checkpoint
    hf_bf16 = copy.deepcopy(hf).bfloat16()
    ours = load_model(path, torch.bfloat16, torch.device("cuda"))
    block_size, num_blocks = 16, 128
    for layer in ours.attention_layers():
        layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                     dtype=torch.bfloat16, device="cuda")
    rng = random.Random(0)
    seqs = [[rng.randrange(10000) for _ in range(n)] for n in (300, 37, 129, 2)]
    tables = torch.randperm(num_blocks, dtype=torch.int32).view(len(seqs), -1)[:, :24].cuda()

    def run(chunks: list[tuple[int, int]]):
        return paged_step_logits(ours, seqs, tables, block_size, chunks)

    run([(0, 200), (0, 30), (0, 0), (0, 1)])
    logits, starts = run([(200, 300), (30, 37), (0, 129), (1, 2)])
    print(f"\n{'request':>8} {'tokens':>7} {'octavo bf16':>12} {'transformers bf16':>18}")
    for i, (start, end) in enumerate([(200, 300), (30, 37), (0, 129), (1, 2)]):
        tokens = torch.tensor([seqs[i][:end]], device="cuda")
        ref = hf(tokens).logits[0, start:end]
        err = rel_error(logits[starts[i]:starts[i + 1]], ref)
        hf_err = rel_error(hf_bf16(tokens).logits[0, start:end], ref)
        print(f"{i:>8} {end - start:>7} {err:>12.2e} {hf_err:>18.2e}")
        assert err <= max(2e-2, 2 * hf_err), f"request {i}: relative logits error {err:.2e}"


def test_greedy_with_cuda_graphs_equals_eager(checkpoint):
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    _, path = checkpoint
    rng = random.Random(1)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(1, 200))] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=256, max_num_seqs=8,
                  enforce_eager=eager, kv_cache_memory=1 << 30)
        tokens[eager] = [out.token_ids for out in llm.generate(prompts, params)]
        llm.engine.shutdown()
    assert tokens[True] == tokens[False]
