"""Mixture-of-experts models (Mixtral, Qwen3-MoE) against transformers: tiny random checkpoints
written by transformers' `save_pretrained` (one tensor per expert, as on the hub), served by
the offline engine. Greedy tokens must be transformers' and logprobs within 1e-4, whole, in
small chunks and over a cached shared prefix; at tensor parallel size 2 (gloo, two processes)
every rank's logits must be transformers'; n-gram speculation keeps the greedy tokens. The
Triton kernel is tested in test_moe_kernel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from engine_core.llm import LLM
from engine_core.protocol import SamplingParams
from tensor_parallel_worker import reference_rows, run_pair
from test_engine import hf_greedy, random_prompts
from test_models import assert_close, hf_logits, randomize
from workers.distributed import TensorParallelGroup
from workers.model_loader import load_model

VOCAB = 512
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rms_norm_eps=1e-5)
CONFIGS = {
    "mixtral": transformers.MixtralConfig(**SMALL, num_hidden_layers=2, intermediate_size=96, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
    # Layer 1 dense (mlp_only_layers); 8 experts, some of which a short prompt leaves without tokens.
    "qwen3-moe": transformers.Qwen3MoeConfig(**SMALL, num_hidden_layers=3, head_dim=16, intermediate_size=96,
                                             moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                             norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True),
    # Every other layer sparse (decoder_sparse_step 2), top-3 renormalized.
    "qwen3-moe-step2-norm": transformers.Qwen3MoeConfig(**SMALL, num_hidden_layers=2, head_dim=16,
                                                        intermediate_size=64, moe_intermediate_size=32, num_experts=6,
                                                        num_experts_per_tok=3, norm_topk_prob=True,
                                                        decoder_sparse_step=2, tie_word_embeddings=False),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """(checkpoint dir, the float32 transformers model saved there). Weights well away from
    zero (randomize) make the router's choices decisive rather than near-ties."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param], dtype=torch.float32).eval()
    randomize(model, seed=len(request.param))
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path), model


def first_sparse_layer(config) -> int:
    if config.model_type == "mixtral":
        return 0
    return next(i for i in range(config.num_hidden_layers)
                if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0)


def test_checkpoint_has_one_tensor_per_expert(tiny):
    """The layout the loader stacks: what the hub and transformers' save_pretrained write."""
    path, model = tiny
    names = load_file(Path(path) / "model.safetensors").keys()
    expert = "block_sparse_moe.experts.3.w2" if model.config.model_type == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.{first_sparse_layer(model.config)}.{expert}.weight" in names


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 8, "max_num_seqs": 3}],
                         ids=["whole", "chunked8"])
def test_greedy_matches_transformers(tiny, engine_args):
    path, hf_model = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, block_size=8, **engine_args)
    prompts = random_prompts(4, seed=1, max_len=30)
    prompts[0] = random_prompts(1, seed=2, max_len=25)[0] + list(range(30, 55))
    prompts.append(prompts[0][:16] + [7] * 9)  # shares two blocks with the first: a prefix-cache hit
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, GREEDY.max_tokens)
        assert out.token_ids == ref_tokens
        ours = [next(iter(d.values())) for d in out.logprobs]
        assert ours == pytest.approx(ref_logprobs, abs=1e-4)
    assert outputs[-1].num_cached_tokens == 16


def test_ngram_speculation_keeps_transformers_greedy_tokens(tiny):
    """Verification steps run several tokens of a request through the experts at once: the
    greedy tokens stay transformers', and drafts were verified."""
    path, hf_model = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, block_size=8, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    prompts = [list(range(30, 45)) * 2, random_prompts(1, seed=5, max_len=20)[0] * 2]
    num_draft_tokens = 0
    engine_step = llm.engine.step

    def step():
        nonlocal num_draft_tokens
        outputs = engine_step()
        num_draft_tokens += outputs.scheduler_stats.spec_num_draft_tokens
        return outputs

    llm.engine.step = step
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.token_ids == hf_greedy(hf_model, prompt, params.max_tokens)[0]
    assert num_draft_tokens > 0


def test_a_rank_holds_its_expert_shards(tiny):
    """Rank 1 of 2, built without a process group: every expert's second half of the gate and
    up rows, stacked in the expert's slot, and the matching half of its down columns; the
    router whole."""
    path, model = tiny
    full = load_file(Path(path) / "model.safetensors")
    ours = load_model(Path(path), torch.float32, CPU, TensorParallelGroup(rank=1, world_size=2))
    mixtral = model.config.model_type == "mixtral"
    block = "block_sparse_moe" if mixtral else "mlp"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    layer = first_sparse_layer(model.config)
    experts = ours.model.layers[layer].mlp.experts
    size = experts.down_proj.weight.shape[2]
    for e in range(experts.gate_up_proj.weight.shape[0]):
        prefix = f"model.layers.{layer}.{block}.experts.{e}."
        assert torch.equal(experts.gate_up_proj.weight[e], torch.cat((full[f"{prefix}{gate}.weight"][size:],
                                                                      full[f"{prefix}{up}.weight"][size:])))
        assert torch.equal(experts.down_proj.weight[e], full[f"{prefix}{down}.weight"][:, size:])
    assert torch.equal(ours.model.layers[layer].mlp.gate.weight, full[f"model.layers.{layer}.{block}.gate.weight"])


def test_tensor_parallel_2_matches_transformers(tmp_path):
    """Every config at TP=2 over two gloo processes: each rank's logits over prefill and
    decode steps through the paged KV cache are transformers'."""
    sequences = random_prompts(2, seed=4, max_len=10)
    sequences = [seq + [5] * (10 - len(seq)) for seq in sequences]  # run_pair's schedule needs 8+ tokens
    checkpoints, expected = {}, {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        randomize(model, seed)
        checkpoints[name] = tmp_path / name
        model.save_pretrained(checkpoints[name])
        expected[name] = reference_rows([hf_logits(model, seq) for seq in sequences])
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    mp.start_processes(run_pair, args=(f"file://{out_dir / 'rendezvous'}", checkpoints, sequences, out_dir),
                       nprocs=2, join=True, start_method="spawn")
    for name in CONFIGS:
        for rank in range(2):
            assert_close(torch.load(out_dir / f"{name}-tp2-rank{rank}.pt")["logits"], expected[name], rel=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dummy_load_format_serves_a_config_alone(name, tmp_path):
    """--load-format dummy: random weights in the MoE shapes from config.json alone."""
    CONFIGS[name].save_pretrained(tmp_path)
    model = load_model(tmp_path, torch.float32, CPU, dummy=True)
    experts = model.model.layers[first_sparse_layer(CONFIGS[name])].mlp.experts
    assert experts.gate_up_proj.weight.abs().max() > 0 and experts.down_proj.weight.abs().max() > 0
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory=1 << 24)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
