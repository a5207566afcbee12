"""Property tests of the scheduler and KV cache manager under random add / abort / finish
sequences. The model's side of a step is played by the test: it samples random tokens for
the requests the scheduler says are due one."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_core.config import SpeculativeConfig
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.protocol import EngineCoreRequest, ModelRunnerOutput, SamplingParams
from engine_core.request import Request, RequestStatus
from engine_core.scheduler import Scheduler

EOS = 0


def check_invariants(scheduler: Scheduler, kv: KVCacheManager) -> None:
    pool = kv.block_pool
    holders = [0] * pool.num_blocks
    for request_id, blocks in kv.req_to_blocks.items():
        ids = [b.block_id for b in blocks]
        assert len(ids) == len(set(ids)), f"request {request_id} holds a block twice"
        for b in blocks:
            holders[b.block_id] += 1
    for block in pool.blocks:
        assert block.ref_cnt == holders[block.block_id], f"block {block.block_id} ref count is off"
    free = []
    node = pool.free_queue.head.next_free
    while node is not pool.free_queue.tail:
        free.append(node.block_id)
        node = node.next_free
    assert len(free) == len(set(free)) == pool.free_queue.num_free
    assert sorted(free) == [b.block_id for b in pool.blocks if b.ref_cnt == 0]
    for request in scheduler.running:
        blocks = kv.req_to_blocks[request.request_id]
        assert len(blocks) * kv.block_size >= request.num_computed_tokens
    for request in scheduler.waiting:
        assert request.request_id not in kv.req_to_blocks or not kv.req_to_blocks[request.request_id]


def step(scheduler: Scheduler, rng: random.Random, vocab: int) -> tuple[int, int]:
    out = scheduler.schedule()
    assert out.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= scheduler.max_num_seqs
    assert all(n > 0 for n in out.num_scheduled_tokens.values())
    due = [rid for rid in out.num_scheduled_tokens
           if scheduler.requests[rid].num_computed_tokens >= scheduler.requests[rid].num_tokens]
    runner_output = ModelRunnerOutput(request_ids=due,
                                      sampled_token_ids=[[rng.randrange(vocab)] for _ in due])
    scheduler.update_from_output(out, runner_output)
    return out.total_num_scheduled_tokens, len(due)


ops = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort"]),
                         st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 48), block_size=st.sampled_from([2, 4, 16]),
       budget=st.integers(1, 64), max_num_seqs=st.integers(1, 8), caching=st.booleans())
def test_random_add_abort_finish(ops, num_blocks, block_size, budget, max_num_seqs, caching):
    max_model_len = min(num_blocks * block_size, 96)
    kv = KVCacheManager(num_blocks, block_size, caching)
    scheduler = Scheduler(kv, budget, max_num_seqs, max_model_len)
    vocab = 4  # a tiny vocabulary makes shared prefixes, and so cache hits, common
    next_id = 0
    for op, seed in ops:
        rng = random.Random(seed)
        if op == "add":
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, max_model_len))]
            params = SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.3)
            scheduler.add_request(Request(EngineCoreRequest(str(next_id), prompt, params), frozenset({EOS})))
            next_id += 1
        elif op == "abort" and scheduler.requests:
            scheduler.abort_requests([rng.choice(sorted(scheduler.requests))])
        else:
            step(scheduler, rng, vocab)
        check_invariants(scheduler, kv)

    # Every request finishes, and then every block is free again.
    rng = random.Random(0)
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler, rng, vocab)
        check_invariants(scheduler, kv)
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == num_blocks
    assert not kv.req_to_blocks


def spec_step(scheduler: Scheduler, kv: KVCacheManager, rng: random.Random, vocab: int,
              outputs: dict[str, int]) -> None:
    """A step with speculative decoding: each due request accepts a random prefix of its
    drafts, gets one more token, and a random new proposal."""
    k = scheduler.speculative_config.num_speculative_tokens
    before = {rid: (r.num_computed_tokens, r.num_tokens) for rid, r in scheduler.requests.items()}
    out = scheduler.schedule()
    assert out.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    for rid, drafts in out.scheduled_spec_token_ids.items():
        request = scheduler.requests[rid]
        num_computed, num_tokens = before[rid]
        assert 1 <= len(drafts) <= k
        # Drafts ride right after the known tokens, and leave room for the token after them.
        assert out.num_scheduled_tokens[rid] == num_tokens - num_computed + len(drafts)
        room = request.sampling_params.max_tokens - request.num_output_tokens
        assert len(drafts) <= room - 1 and num_tokens + len(drafts) < scheduler.max_model_len
    for rid in out.num_scheduled_tokens:
        request = scheduler.requests[rid]
        slots = len(kv.req_to_blocks[rid]) * kv.block_size
        assert slots >= min(request.num_computed_tokens + scheduler.num_lookahead_tokens, scheduler.max_model_len)
    due = [rid for rid in out.num_scheduled_tokens
           if scheduler.requests[rid].num_computed_tokens
           >= scheduler.requests[rid].num_tokens + len(out.scheduled_spec_token_ids.get(rid, ()))]
    sampled, proposals = [], {}
    for rid in due:
        drafts = out.scheduled_spec_token_ids.get(rid, [])
        sampled.append(drafts[:rng.randint(0, len(drafts))] + [rng.randrange(vocab)])
        if out.propose_drafts and rng.random() < 0.8:
            proposals[rid] = [rng.randrange(1, vocab) for _ in range(rng.randint(0, k))]
    for rid, output in zip(due, scheduler.update_from_output(
            out, ModelRunnerOutput(request_ids=due, sampled_token_ids=sampled, draft_token_ids=proposals))):
        outputs[rid] = outputs.get(rid, 0) + len(output.new_token_ids)
        request = scheduler.requests.get(rid)
        if request is not None:
            assert request.num_computed_tokens <= request.num_tokens
            assert request.num_output_placeholders == 0


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 48), block_size=st.sampled_from([2, 4, 16]),
       budget=st.integers(1, 64), max_num_seqs=st.integers(1, 8), caching=st.booleans(),
       method=st.sampled_from(["ngram", "draft_model"]), k=st.integers(1, 5),
       disable_by_batch_size=st.sampled_from([None, 1, 3]))
def test_random_with_speculation(ops, num_blocks, block_size, budget, max_num_seqs, caching, method, k,
                                 disable_by_batch_size):
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k, model="draft" if method == "draft_model" else None,
                             disable_by_batch_size=disable_by_batch_size)
    max_model_len = min(num_blocks * block_size, 96)
    kv = KVCacheManager(num_blocks, block_size, caching)
    scheduler = Scheduler(kv, budget, max_num_seqs, max_model_len, spec)
    vocab = 4
    outputs: dict[str, int] = {}
    max_tokens: dict[str, int] = {}
    for n, (op, seed) in enumerate(ops):
        rng = random.Random(seed)
        if op == "add":
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, max_model_len))]
            params = SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.3)
            scheduler.add_request(Request(EngineCoreRequest(str(n), prompt, params), frozenset({EOS})))
            max_tokens[str(n)] = params.max_tokens
        elif op == "abort" and scheduler.requests:
            scheduler.abort_requests([rng.choice(sorted(scheduler.requests))])
        else:
            spec_step(scheduler, kv, rng, vocab, outputs)
        check_invariants(scheduler, kv)

    rng = random.Random(0)
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        spec_step(scheduler, kv, rng, vocab, outputs)
        check_invariants(scheduler, kv)
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == num_blocks
    # A request never gets more than max_tokens tokens, however many drafts were accepted.
    assert all(count <= max_tokens[rid] for rid, count in outputs.items())


def _request(request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(EngineCoreRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens)),
                   frozenset({EOS}))


def test_prefix_hit_computes_only_new_blocks():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64)
    shared = list(range(1, 21))  # 5 full blocks
    scheduler.add_request(_request("a", shared + [30, 31]))
    step(scheduler, random.Random(0), 50)
    scheduler.add_request(_request("b", shared + [40, 41, 42]))
    out = scheduler.schedule()
    # b reuses a's 5 full blocks: only its last 3 tokens are computed.
    assert out.num_scheduled_tokens["b"] == 3
    assert scheduler.requests["b"].num_cached_tokens == 20
    new_b = next(r for r in out.new_requests if r.request_id == "b")
    assert new_b.block_ids[:5] == kv.get_block_ids("a")[:5]


def test_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=32)
    prompt = list(range(1, 9))  # exactly 2 blocks
    scheduler.add_request(_request("a", prompt, max_tokens=1))
    step(scheduler, random.Random(0), 50)
    assert "a" not in scheduler.requests  # finished at max_tokens=1
    scheduler.add_request(_request("b", prompt, max_tokens=1))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens["b"] == 4  # the last block is recomputed for its logits
    assert scheduler.requests["b"].num_cached_tokens == 4


def test_chunked_prefill_shares_the_budget_with_decodes():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64)
    scheduler.add_request(_request("short", [1, 2, 3], max_tokens=10))
    step(scheduler, random.Random(0), 50)
    scheduler.add_request(_request("long", list(range(1, 31))))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"short": 1, "long": 7}


def test_preemption_frees_the_newest_and_requeues_it_first():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=16)
    scheduler.add_request(_request("old", [1] * 7, max_tokens=8))
    scheduler.add_request(_request("new", [2] * 7, max_tokens=8))
    rng = random.Random(0)
    step(scheduler, rng, 50)
    step(scheduler, rng, 50)  # each holds 2 full blocks: the pool is full
    assert kv.num_free_blocks == 0 and not scheduler.waiting
    step(scheduler, rng, 50)  # "old" needs a third block: "new" is preempted
    assert scheduler.waiting[0].request_id == "new"
    assert scheduler.waiting[0].status == RequestStatus.PREEMPTED
    assert scheduler.waiting[0].num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    assert [r.request_id for r in scheduler.running] == ["old"]
