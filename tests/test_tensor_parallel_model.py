"""Tensor-parallel models on the CPU (gloo), in real processes: tiny random Llama, Qwen2 and
Qwen3 checkpoints loaded at TP=2 and TP=4 must give the logits of TP=1 and of transformers
over a prefill and decodes through the paged KV cache, on every rank.

One spawn of 4 processes runs everything (the process-group set-up is the cost): TP=4 over
all of them and TP=2 over two independent pairs. The configs cover tied embeddings, a
vocabulary that no rank count divides, biases on q/k/v, o_proj and the MLP (a row-parallel
bias must be added once), KV heads sharded (2 heads, TP=2) and replicated (1 head at TP=2,
2 heads at TP=4), and Qwen3's per-head q/k norms with head_dim != hidden / heads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from tensor_parallel_worker import reference_rows, run_rank, run_schedule
from test_model_loading import SMALL, hf_logits, tiny_model
from test_models import assert_close
from workers.distributed import TensorParallelGroup
from workers.model_loader import load_model
from workers.models import LlamaForCausalLM

CPU = torch.device("cpu")
CONFIGS = {
    "llama-tied-bias-vocab263": LlamaConfig(**{**SMALL, "vocab_size": 263}, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True),
    "qwen2-kv1": Qwen2Config(**{**SMALL, "num_key_value_heads": 1}, tie_word_embeddings=False),
    "qwen3": Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
}
SEQUENCES = [[3, 17, 200, 42, 256, 9, 77, 130, 5, 258], [11, 0, 199, 64, 250, 33, 8, 101]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """name -> (checkpoint dir, transformers' logits in `run_schedule`'s row order)."""
    result = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        reference = tiny_model(config, seed)
        path = tmp_path_factory.mktemp(name)
        reference.save_pretrained(path)
        result[name] = (path, reference_rows([hf_logits(reference, seq) for seq in SEQUENCES]))
    return result


@pytest.fixture(scope="module")
def rank_outputs(checkpoints, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tp-outputs")
    init_method = f"file://{out_dir / 'rendezvous'}"
    paths = {name: path for name, (path, _) in checkpoints.items()}
    mp.start_processes(run_rank, args=(init_method, paths, SEQUENCES, out_dir), nprocs=4,
                       join=True, start_method="spawn")
    return out_dir


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_logits_match_tp1_and_transformers(name, checkpoints, rank_outputs):
    path, expected = checkpoints[name]
    single = run_schedule(load_model(path, torch.float32, CPU), SEQUENCES)
    assert single.shape == expected.shape == (len(expected), CONFIGS[name].vocab_size)
    assert_close(single, expected, rel=1e-5)
    config = CONFIGS[name]
    for tp_size in (2, 4):
        for rank in range(tp_size):
            out = torch.load(rank_outputs / f"{name}-tp{tp_size}-rank{rank}.pt")
            assert out["logits"].shape == expected.shape, (tp_size, rank)
            assert_close(out["logits"], single, rel=1e-5)
            assert_close(out["logits"], expected, rel=1e-5)
            kv_heads = max(1, config.num_key_value_heads // tp_size)
            assert out["heads"] == (config.num_attention_heads // tp_size, kv_heads)
            assert out["tied"] == config.tie_word_embeddings


def test_a_rank_holds_its_shards(checkpoints):
    """Rank 3 of 4, built without any process group (loading needs no collective): its q
    head and the one KV head its query heads use, its MLP rows and columns, its vocab range
    padded with a zero row, the tied head sharing it, replicated norms and row biases."""
    path, _ = checkpoints["llama-tied-bias-vocab263"]
    full = load_file(path / "model.safetensors")
    model = load_model(path, torch.float32, CPU, TensorParallelGroup(rank=3, world_size=4))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ckpt = "model.layers.0.self_attn."
    q, k, v = (full[f"{ckpt}{p}_proj.weight"] for p in "qkv")
    kv_rows = slice(16, 32)  # rank 3 of 4 with 2 KV heads uses head 3 * 2 // 4 = 1
    assert torch.equal(attn.qkv_proj.weight, torch.cat((q[48:64], k[kv_rows], v[kv_rows])))
    assert torch.equal(attn.qkv_proj.bias, torch.cat((full[f"{ckpt}q_proj.bias"][48:64],
                                                      full[f"{ckpt}k_proj.bias"][kv_rows],
                                                      full[f"{ckpt}v_proj.bias"][kv_rows])))
    assert torch.equal(attn.o_proj.weight, full[f"{ckpt}o_proj.weight"][:, 48:64])
    assert torch.equal(attn.o_proj.bias, full[f"{ckpt}o_proj.bias"])
    gate, up = full["model.layers.0.mlp.gate_proj.weight"], full["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat((gate[96:], up[96:])))
    assert torch.equal(mlp.down_proj.weight, full["model.layers.0.mlp.down_proj.weight"][:, 96:])
    embed = model.model.embed_tokens.weight
    assert embed.shape == (66, 64)  # ceil(263 / 4) rows, the last one padding
    assert torch.equal(embed[:65], full["model.embed_tokens.weight"][198:])
    assert not embed[65:].any()
    assert model.lm_head.weight is embed
    assert torch.equal(model.model.norm.weight, full["model.norm.weight"])


@pytest.mark.parametrize("sizes, tp_size, message", [
    ({}, 3, r"tensor_parallel_size 3 must divide num_attention_heads 4; .*allows: \[1, 2, 4\]"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 96,
      "intermediate_size": 96}, 6,
     r"tensor_parallel_size 6 must divide num_key_value_heads 4 or be a multiple of it; "
     r".*allows: \[1, 2, 4, 12\]"),
    ({"intermediate_size": 90}, 4, r"tensor_parallel_size 4 must divide intermediate_size 90; .*allows: \[1, 2\]"),
])
def test_indivisible_tensor_parallel_size_is_named(sizes, tp_size, message):
    config = LlamaConfig(**{**SMALL, **sizes})
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM(config, torch.float32, TensorParallelGroup(rank=0, world_size=tp_size))


def test_single_rank_collectives_return_their_input():
    x = torch.ones(2, 3)
    assert TensorParallelGroup().all_reduce(x) is x
    assert TensorParallelGroup().all_gather(x) is x
