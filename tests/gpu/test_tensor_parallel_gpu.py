"""Tensor parallelism on two GPUs (NCCL) against transformers, on the same random weights.
The CPU tests (tests/test_tensor_parallel*.py, gloo) check the sharding itself; these
check it over NCCL, with the Triton kernels and CUDA graphs.

    python -m pytest tests/gpu/test_tensor_parallel_gpu.py -q     (skipped with fewer than 2 GPUs)

- bfloat16 logits of a mixed batch (prefill chunks over cached prefixes plus a decode) at TP=2,
  on both ranks, within the single-GPU test's bound (relative error <= 2e-2) of TP=1's and of
  transformers' in float32 on the same bf16-rounded weights.
- Greedy float32 generation at TP=2, eager and with CUDA graphs, equals transformers token for
  token.

(Written without two GPUs at hand: not yet run. The ranks' code of the logits check ran on the
CPU over gloo in float32, where TP=2 is 5e-7 from TP=1.)
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.multiprocessing as mp
import transformers

from tests.gpu.paged_steps import SEQUENCE_LENGTHS, STEPS, mixed_batch_logits
from tests.gpu.tensor_parallel_ranks import run_rank

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

VOCAB = 1000
MAX_TOKENS = 24
# Query and KV heads that two ranks split evenly (Qwen3: 8 KV heads; Llama: 2, one per rank).
CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096),
    "llama-gqa4": lambda: transformers.LlamaConfig(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1024, vocab_size=VOCAB, max_position_embeddings=4096),
}
# Several engines share the GPUs within one test session.
ENGINE_ARGS = dict(max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=16, kv_cache_memory=1 << 30)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def random_prompts(seed: int, count: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 300))] for _ in range(count)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_logits_at_tp2_match_tp1_and_transformers(checkpoint, tmp_path):
    from workers.model_loader import load_model

    hf_cpu, path = checkpoint
    rng = random.Random(0)
    seqs = [[rng.randrange(VOCAB) for _ in range(n)] for n in SEQUENCE_LENGTHS]
    cuda = torch.device("cuda", 0)
    tp1, starts = mixed_batch_logits(load_model(path, torch.bfloat16, cuda), seqs, torch.bfloat16, cuda)
    mp.start_processes(run_rank, args=(f"file://{tmp_path / 'rendezvous'}", path, seqs, torch.bfloat16, "cuda",
                                       tmp_path / "tp2"), nprocs=2, join=True, start_method="spawn")
    # The reference runs the weights as rounded to bfloat16, in float32 arithmetic.
    hf = copy.deepcopy(hf_cpu).to(cuda)
    for param in hf.parameters():
        param.data = param.data.to(torch.bfloat16).float()
    with torch.inference_mode():
        reference = [hf(torch.tensor([seq[:end]], device=cuda)).logits[0, start:end].cpu()
                     for seq, (start, end) in zip(seqs, STEPS[1]) if end > start]
    for rank in range(2):
        tp2 = torch.load(f"{tmp_path / 'tp2'}-rank{rank}.pt")
        assert tp2.shape == tp1.shape
        err = rel_error(tp2, tp1.cpu())
        print(f"rank {rank}: TP=2 against TP=1 {err:.2e}")
        assert err <= 2e-2, f"rank {rank}: TP=2 logits {err:.2e} from TP=1's"
        for i, ref in enumerate(reference):
            err = rel_error(tp2[starts[i]:starts[i + 1]], ref)
            assert err <= 2e-2, f"rank {rank}, request {i}: {err:.2e} from transformers"


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_greedy_generation_at_tp2_matches_transformers_fp32(checkpoint, enforce_eager):
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    hf_cpu, path = checkpoint
    hf = hf_cpu.to("cuda")
    prompts = random_prompts(1)
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2, enforce_eager=enforce_eager, **ENGINE_ARGS)
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        llm.engine.shutdown()
    for prompt, out in zip(prompts, outputs):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=MAX_TOKENS, do_sample=False)
        assert out.token_ids == ref[0, len(prompt):].tolist()

