"""The fused mixture-of-experts kernel (`kernels.triton_moe`) against its torch reference
(`kernels.moe_reference`) under the Triton interpreter, and the reference against a
token-by-token loop. Shapes are small but not tile multiples (hidden 80, intermediate 48), so
every mask is exercised; the cases cover experts that receive no tokens, top-k 1 and 2+,
one token, and token counts that pick each of the decode, medium and prefill tile sets."""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F

from kernels import moe_reference
from triton_interpreter import interpreter_tests, run_cases

HIDDEN, INTERMEDIATE = 80, 48


def moe_inputs(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype = torch.float32,
               unused_experts: tuple[int, ...] = (), seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random hidden states and expert weights, and each token's top_k distinct experts drawn
    from those not in `unused_experts`, with random positive weights summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, HIDDEN, INTERMEDIATE, generator=gen) / INTERMEDIATE ** 0.5).to(dtype)
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused_experts])
    choice = torch.rand(num_tokens, len(allowed), generator=gen).argsort(dim=1)[:, :top_k]
    topk_ids = allowed[choice].to(torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen).softmax(dim=-1)
    return hidden, w13, w2, topk_weights, topk_ids


def token_by_token(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for t in range(len(hidden)):
        for weight, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            gate, up = (w13[e].float() @ hidden[t].float()).chunk(2)
            out[t] += weight * (w2[e].float() @ (F.silu(gate) * up))
    return out


def test_reference_matches_a_token_by_token_loop():
    args = moe_inputs(9, 6, 3, unused_experts=(2,))
    torch.testing.assert_close(moe_reference.fused_moe(*args), token_by_token(*args), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- interpreter cases

def _kernel_case(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype = torch.float32,
                 unused_experts: tuple[int, ...] = (), expected_block_m: int | None = None) -> Callable[[], None]:
    def case() -> None:
        from kernels import triton_moe

        if expected_block_m is not None:
            assert triton_moe.block_config(num_tokens, top_k, num_experts).block_m == expected_block_m
        args = moe_inputs(num_tokens, num_experts, top_k, dtype, unused_experts)
        out = triton_moe.fused_moe(*args)
        assert out.dtype == dtype and out.shape == (num_tokens, HIDDEN)
        tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(out, moe_reference.fused_moe(*args), **tolerance)
    return case


def _case_align() -> None:
    """Each expert's pairs form one run padded to a multiple of block_m; each block names its
    expert; every pair appears exactly once; nothing lies past num_rows but padding."""
    from kernels import triton_moe

    num_experts, block_m = 6, 4
    topk_ids = moe_inputs(7, num_experts, 2, unused_experts=(0, 4))[4]
    sorted_ids, expert_ids, num_rows = triton_moe.moe_align(topk_ids, num_experts, block_m)
    flat = topk_ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert num_rows.tolist() == [int(padded.sum())]
    assert len(sorted_ids) % block_m == 0 and len(expert_ids) == len(sorted_ids) // block_m
    start = 0
    for expert in range(num_experts):
        run = sorted_ids[start:start + padded[expert]]
        real = run[run < len(flat)]
        assert len(real) == counts[expert] and (flat[real.long()] == expert).all()
        assert (run[counts[expert]:] == len(flat)).all()  # padding after the real pairs
        assert (expert_ids[start // block_m:(start + padded[expert]) // block_m] == expert).all()
        start += int(padded[expert])
    assert (sorted_ids[start:] == len(flat)).all() and (expert_ids[start // block_m:] >= num_experts).all()
    assert sorted(sorted_ids[sorted_ids < len(flat)].tolist()) == list(range(len(flat)))


def _case_align_small_equals_sorted() -> None:
    """The one-program align and the sort-based one give the same layout, at decode sizes up
    to the largest the small kernel takes (16 tokens, 128 experts, top-8), with unused experts."""
    from kernels import triton_moe

    for num_tokens, num_experts, top_k, block_m in ((1, 128, 8, 16), (16, 128, 8, 16), (5, 8, 2, 16),
                                                   (3, 6, 2, 4), (12, 60, 4, 32)):
        topk_ids = moe_inputs(num_tokens, num_experts, top_k, unused_experts=(0, 3), seed=num_tokens)[4]
        pairs = topk_ids.numel()
        max_rows = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
        small = triton_moe.moe_align_small(topk_ids, num_experts, block_m, max_rows)
        for got, expected in zip(small, triton_moe.moe_align_sorted(topk_ids, num_experts, block_m, max_rows)):
            assert torch.equal(got, expected), (num_tokens, num_experts, top_k, block_m)


def _case_empty_batch() -> None:
    from kernels import triton_moe

    out = triton_moe.fused_moe(*moe_inputs(0, 4, 2))
    assert out.shape == (0, HIDDEN)


INTERPRETER_CASES: dict[str, Callable[[], None]] = {
    "align": _case_align,
    "align_small_equals_sorted": _case_align_small_equals_sorted,
    "one_token_top1": _kernel_case(1, 4, 1, expected_block_m=16),
    "decode_top2_unused_experts": _kernel_case(3, 8, 2, unused_experts=(0, 5, 6), expected_block_m=16),
    "decode_top4_float16": _kernel_case(5, 8, 4, torch.float16, expected_block_m=16),
    "medium_top2": _kernel_case(40, 4, 2, unused_experts=(1,), expected_block_m=32),
    "prefill_top2": _kernel_case(160, 4, 2, expected_block_m=64),
    "prefill_top1_float16_unused_expert": _kernel_case(150, 2, 1, torch.float16, unused_experts=(0,),
                                                       expected_block_m=64),
    "empty_batch": _case_empty_batch,
}


interpreter_results, test_triton_kernel_matches_reference = interpreter_tests(__file__, INTERPRETER_CASES)


if __name__ == "__main__":
    run_cases(INTERPRETER_CASES, sys.argv[1])
