"""Which CUDA graphs a model runner captures for steps that are not pure decodes, and which one a
step replays. The graphs themselves need a GPU (tests/gpu); their shapes are plain arithmetic.

- Every step the scheduler can form within the caps (at least one token per request) fits a
  captured shape, and the one picked has the fewest tokens of those that fit.
- No shape holds more tokens than the token budget, max_model_len or the padded-graph limit:
  the padding request's tokens must fit in one sequence.
- With speculative decoding the exact verification shapes (1 + k tokens per request) are there.
"""

from __future__ import annotations

import pytest

from workers.cuda_graphs import MAX_PADDED_GRAPH_TOKENS, decode_sizes, fit_padded_shape, padded_shapes

CONFIGS = [  # max_num_seqs, max_num_batched_tokens, max_model_len, 1 + k
    (16, 256, 1024, 1),
    (16, 2048, 1024, 4),
    (256, 8192, 1024, 1),
    (200, 100, 4096, 1),  # more sequences than budgeted tokens
    (64, 2048, 300, 9),  # max_model_len below the budget
    (4, 8, 64, 1),  # a budget below the smallest token size
]


@pytest.mark.parametrize("max_num_seqs,max_num_tokens,max_model_len,spec_query_len", CONFIGS)
def test_every_step_fits_the_smallest_shape(max_num_seqs, max_num_tokens, max_model_len, spec_query_len):
    shapes = padded_shapes(max_num_seqs, max_num_tokens, max_model_len, spec_query_len)
    cap = min(max_num_tokens, max_model_len, MAX_PADDED_GRAPH_TOKENS)
    assert shapes == sorted(shapes, key=lambda s: (s.num_tokens, s.num_reqs))
    assert all(not s.decode and 1 <= s.num_reqs <= min(s.num_tokens, max_num_seqs) and s.num_tokens <= cap
               for s in shapes)
    assert shapes[-1].num_tokens == cap
    for num_reqs in sorted({1, 2, 3, 5, 16, 17, max_num_seqs // 2, max_num_seqs} & set(range(1, max_num_seqs + 1))):
        for num_tokens in sorted({num_reqs, num_reqs + 1, 15, 16, 17, 100, 513, cap - 1, cap}):
            if not num_reqs <= num_tokens <= cap:
                continue
            shape = fit_padded_shape(shapes, num_reqs, num_tokens)
            fits = [s for s in shapes if s.num_reqs >= num_reqs and s.num_tokens >= num_tokens]
            assert shape is not None, (num_reqs, num_tokens)
            assert shape in fits and shape.num_tokens == min(s.num_tokens for s in fits)
    # Past the caps a step runs eagerly.
    assert fit_padded_shape(shapes, 1, cap + 1) is None
    if spec_query_len > 1:
        verify = {(b, b * spec_query_len) for b in decode_sizes(max_num_seqs) if b * spec_query_len <= cap}
        assert verify and verify <= {(s.num_reqs, s.num_tokens) for s in shapes}
