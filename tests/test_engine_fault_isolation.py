"""One request must never take the engine down. A request that fails inside the worker (a bad
value that slipped past validation, reaching the real worker) ends alone with an error, while
every request batched with it produces exactly the tokens it produces alone, all KV blocks come
back, and the engine keeps serving."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
import transformers
import zmq
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine_core.config import EngineConfig
from engine_core.engine import MAX_FAILED_STEPS_IN_A_ROW, EngineCore, StepMode
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.llm import LLM
from engine_core.protocol import (
    MAX_LOGPROBS,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    FinishReason,
    ModelRunnerOutput,
    RequestType,
    SamplingParams,
)
from engine_core.request import Request
from engine_core.scheduler import Scheduler
from tests.test_engine import VOCAB, build_tiny, random_prompts
from tests.test_scheduler import EOS, check_invariants
from tests.test_spec_decode import NGRAM, prompts_with_repeats

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Values the worker cannot run, queued past `validate_request` as if they had slipped through
# it, and built directly: msgspec checks a field's bounds only when it decodes.
BAD = {
    # Overflows the worker's int64 top-k row as the request joins its batch, before the forward.
    "top_k": (SamplingParams(temperature=0.0, top_k=2**63, max_tokens=6), "OverflowError"),
    # More alternatives than the vocabulary has: the sampler fails after the forward has
    # written the step's KV.
    "logprobs": (SamplingParams(temperature=0.0, logprobs=VOCAB + 1, max_tokens=6), "RuntimeError"),
}

Arrivals = dict[int, list[tuple[str, list[int], SamplingParams]]]
Outputs = dict[str, list[tuple[int, EngineCoreOutput]]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    build_tiny("llama", path)
    return str(path)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Prompts of one to seven blocks; the last shares two full blocks with the first, so the
    prefix cache serves it."""
    prompts = random_prompts(5, seed=11, max_len=70)
    prompts[0] = prompts[0] + list(range(40))
    return prompts + [prompts[0][:32] + [9] * 8]


@pytest.fixture(scope="module")
def alone(tiny_path, prompts) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy tokens, run alone on an engine of its own."""
    llm = LLM(tiny_path, kv_cache_memory=1 << 24)
    return {tuple(p): llm.generate([p], GREEDY)[0].token_ids for p in prompts + prompts_with_repeats()}


def slip_in(engine: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    """Queue a request past `validate_request`."""
    engine.scheduler.add_request(Request(EngineCoreRequest(request_id, prompt, params), engine.eos_token_ids))


def run(engine: EngineCore, arrivals: Arrivals) -> Outputs:
    """Step the engine until every request is done, adding each arrival before the step of its
    index (those named "bad…" past validation); return each request's (step, output) pairs."""
    outputs: Outputs = {}
    step = 0
    while engine.has_unfinished_requests() or step <= max(arrivals):
        assert step < 1000, "the engine stopped making progress"
        for request_id, prompt, params in arrivals.get(step, []):
            if request_id.startswith("bad"):
                slip_in(engine, request_id, prompt, params)
            else:
                engine.add_request(EngineCoreRequest(request_id, prompt, params))
            outputs[request_id] = []
        for out in engine.step().outputs:
            outputs[out.request_id].append((step, out))
        step += 1
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.block_pool.num_blocks, "KV blocks leaked"
    assert not engine.scheduler.suspects
    return outputs


def tokens_of(outputs: Outputs, request_id: str) -> list[int]:
    return [t for _, out in outputs[request_id] for t in out.new_token_ids]


def first_token_step(outputs: Outputs, request_id: str) -> int:
    return next(step for step, out in outputs[request_id] if out.new_token_ids)


def check(outputs: Outputs, good: dict[str, list[int]], alone: dict[tuple[int, ...], list[int]],
          bad: dict[str, str]) -> None:
    for request_id, prompt in good.items():
        last = outputs[request_id][-1][1]
        assert last.finish_reason == FinishReason.LENGTH, last.error
        assert tokens_of(outputs, request_id) == alone[tuple(prompt)], request_id
    for request_id, error in bad.items():
        assert [out.finish_reason for _, out in outputs[request_id]] == [FinishReason.ERROR]
        assert tokens_of(outputs, request_id) == []
        assert error in outputs[request_id][-1][1].error
        assert outputs[request_id][-1][1].error_is_internal  # the frontend answers 500, not 400


def keeps_serving(llm: LLM, prompts: list[list[int]], alone: dict[tuple[int, ...], list[int]]) -> None:
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == alone[tuple(prompt)]


def greedy(requests: dict[str, list[int]]) -> list[tuple[str, list[int], SamplingParams]]:
    return [(request_id, prompt, GREEDY) for request_id, prompt in requests.items()]


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_request_admitted_with_new_ones(tiny_path, prompts, alone, async_scheduling, bad):
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, async_scheduling=async_scheduling)
    params, error = BAD[bad]
    good = {f"g{i}": p for i, p in enumerate(prompts)}
    # The bad one joins the first step with every good one, whose prefills (and the blocks they
    # register in the prefix cache) that step was to compute.
    arrivals = greedy(dict(list(good.items())[:3])) + [("bad", [5, 6, 7], params)] \
        + greedy(dict(list(good.items())[3:]))
    outputs = run(llm.engine, {0: arrivals})
    check(outputs, good, alone, {"bad": error})
    keeps_serving(llm, prompts, alone)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_request_arriving_mid_decode(tiny_path, prompts, alone, async_scheduling, bad):
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, max_num_batched_tokens=64,
              async_scheduling=async_scheduling)
    params, error = BAD[bad]
    good = {f"g{i}": p for i, p in enumerate(prompts)}
    early = dict(list(good.items())[:4])
    # Arrives beside a new good request, while the early ones decode (their prompts chunked
    # over the first steps).
    outputs = run(llm.engine, {0: greedy(early),
                               7: [("bad", prompts[1][:20], params)] + greedy(dict(list(good.items())[4:]))})
    assert all(first_token_step(outputs, request_id) < 6 for request_id in early)
    check(outputs, good, alone, {"bad": error})
    keeps_serving(llm, prompts, alone)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_request_with_the_kv_cache_full(tiny_path, prompts, alone, async_scheduling):
    """Too few KV blocks for the batch: requests are preempted before and after the failure."""
    block_bytes = 2 * 2 * 2 * 16 * 4 * 16  # 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes x 16 tokens
    llm = LLM(tiny_path, kv_cache_memory=12 * block_bytes, max_model_len=128, async_scheduling=async_scheduling)
    good = {f"g{i}": p for i, p in enumerate(prompts)}
    outputs = run(llm.engine, {0: greedy(dict(list(good.items())[:4])),
                               3: [("bad", [5, 6, 7], BAD["top_k"][0])] + greedy(dict(list(good.items())[4:]))})
    check(outputs, good, alone, {"bad": "OverflowError"})
    keeps_serving(llm, prompts, alone)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_survive_the_recompute(tiny_path, prompts, alone, async_scheduling):
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    with_logprobs = msgspec.structs.replace(GREEDY, prompt_logprobs=2)
    expected = llm.generate([prompts[0]], with_logprobs)[0].prompt_logprobs
    bad = BAD["top_k"][0]
    # bad0 fails a step in the middle of g0's chunked prefill, bad1 one after its first token.
    outputs = run(llm.engine, {0: [("g0", prompts[0], with_logprobs), ("g1", prompts[1], GREEDY)],
                               1: [("bad0", [5, 6, 7], bad)], 12: [("bad1", [5, 6, 7], bad)]})
    assert first_token_step(outputs, "g0") < 12 < outputs["g0"][-1][0]
    check(outputs, {"g0": prompts[0], "g1": prompts[1]}, alone, {"bad0": "OverflowError", "bad1": "OverflowError"})
    # Sent once, whole, with the first token: not again when the recompute computes them anew.
    sent = [out.prompt_logprobs for _, out in outputs["g0"] if out.prompt_logprobs is not None]
    assert len(sent) == 1 and outputs["g0"][0][1].prompt_logprobs is sent[0]
    assert [row[0] for row in sent[0].token_ids] == prompts[0][1:]
    for ids, values, ref in zip(sent[0].token_ids, sent[0].logprobs, expected, strict=True):
        ours = dict(zip(ids, values))  # as LLM gives them: the prompt token first, then the top 2
        assert list(ours) == list(ref)
        assert list(ours.values()) == pytest.approx(list(ref.values()), abs=1e-4)


@pytest.mark.parametrize("collect_first", [False, True], ids=["launch-first", "collect-first"])
def test_speculative_decoding(tiny_path, alone, collect_first):
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, speculative_config=NGRAM)
    # On a GPU without async scheduling the engine collects a step before launching the next.
    llm.engine.set_step_mode(StepMode.COLLECT_FIRST if collect_first else StepMode.SYNC)
    prompts = prompts_with_repeats()
    good = {f"g{i}": p for i, p in enumerate(prompts)}
    outputs = run(llm.engine, {0: greedy(dict(list(good.items())[:6])),
                               4: [("bad", [11, 22, 33, 11, 22], BAD["top_k"][0])]
                               + greedy(dict(list(good.items())[6:]))})
    check(outputs, good, alone, {"bad": "OverflowError"})
    keeps_serving(llm, prompts, alone)


def test_several_bad_requests_and_a_lone_one(tiny_path, prompts, alone):
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, async_scheduling=True)
    good = {f"g{i}": p for i, p in enumerate(prompts[:4])}
    arrivals = [("bad0", [1, 2], BAD["top_k"][0]), ("g0", good["g0"], GREEDY), ("bad1", [3, 4], BAD["logprobs"][0]),
                ("bad2", [5, 6], BAD["top_k"][0])] + greedy(dict(list(good.items())[1:]))
    outputs = run(llm.engine, {0: arrivals})
    check(outputs, good, alone, {"bad0": "OverflowError", "bad1": "RuntimeError", "bad2": "OverflowError"})
    # Alone in the engine, a bad request fails at once, and the next one is served.
    outputs = run(llm.engine, {0: [("bad3", [7], BAD["logprobs"][0])], 1: [("g9", prompts[4], GREEDY)]})
    check(outputs, {"g9": prompts[4]}, alone, {"bad3": "RuntimeError"})


# ---- the scheduler's side, the model's played by the test ----


def request(request_id: str, prompt: list[int]) -> Request:
    return Request(EngineCoreRequest(request_id, prompt, SamplingParams(max_tokens=4)), frozenset({EOS}))


def test_suspects_run_alone_and_take_back_kv():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_batched_tokens=12, max_num_seqs=4, max_model_len=32)
    scheduler.add_request(request("a", list(range(1, 9))))
    scheduler.add_request(request("b", list(range(11, 23))))
    failed = scheduler.schedule()
    assert failed.num_scheduled_tokens == {"a": 8, "b": 4}  # b's prompt chunked
    assert scheduler.recover_from_failed_step(failed, "boom") == []
    assert scheduler.suspects == {"a", "b"} and not scheduler.running
    assert kv.num_free_blocks == 4 and not kv.block_pool.cached_blocks
    assert [(r.request_id, r.num_computed_tokens) for r in scheduler.waiting] == [("a", 0), ("b", 0)]
    scheduler.add_request(request("c", [5, 6]))  # arrives meanwhile: waits for the suspects
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    scheduler.update_from_output(out, ModelRunnerOutput(request_ids=["a"], sampled_token_ids=[[3]]))
    assert scheduler.suspects == {"b"}
    # b's whole prompt does not fit beside a, which gives its blocks back.
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"b": 12} and out.finished_request_ids == ["a"]
    assert [r.request_id for r in scheduler.running] == ["b"]
    assert [r.request_id for r in scheduler.waiting] == ["a", "c"]
    scheduler.update_from_output(out, ModelRunnerOutput(request_ids=["b"], sampled_token_ids=[[3]]))
    assert not scheduler.suspects
    assert "b" in scheduler.schedule().num_scheduled_tokens  # a normal step again


def test_a_step_of_one_request_blames_it():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=32)
    scheduler.add_request(request("a", [1, 2, 3, 4, 5]))
    failed = scheduler.schedule()
    [out] = scheduler.recover_from_failed_step(failed, "boom")
    assert (out.request_id, out.finish_reason, out.error, out.new_token_ids) == ("a", FinishReason.ERROR, "boom", [])
    assert out.error_is_internal
    assert not scheduler.has_unfinished_requests() and not scheduler.suspects
    assert kv.num_free_blocks == 8
    # A suspect that finishes or is aborted before its turn is simply no longer one.
    for request_id in "bcd":
        scheduler.add_request(request(request_id, [1, 2, 3]))
    assert scheduler.recover_from_failed_step(scheduler.schedule(), "boom") == []
    scheduler.abort_requests(["b", "c", "d"])
    scheduler.add_request(request("e", [1, 2]))
    assert scheduler.schedule().num_scheduled_tokens == {"e": 2} and not scheduler.suspects


def step_alone_if_suspect(scheduler: Scheduler, rng: random.Random, vocab: int) -> None:
    """A step, the model sampling random tokens; with suspects left it runs one of them alone."""
    suspects = scheduler.suspects & scheduler.requests.keys()
    out = scheduler.schedule()
    if suspects:
        assert len(out.num_scheduled_tokens) <= 1 and set(out.num_scheduled_tokens) <= suspects
    due = [rid for rid in out.num_scheduled_tokens
           if scheduler.requests[rid].num_computed_tokens >= scheduler.requests[rid].num_tokens]
    scheduler.update_from_output(out, ModelRunnerOutput(request_ids=due,
                                                        sampled_token_ids=[[rng.randrange(vocab)] for _ in due]))


fault_ops = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort", "fail"]),
                               st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
# Suspects of a failed batch, all aborted before any ran alone: none may stay a suspect.
@example(ops=[("add", 0), ("add", 0), ("fail", 0), ("abort", 0), ("abort", 0)], num_blocks=8, block_size=2,
         budget=14, max_num_seqs=2, caching=False)
@given(ops=fault_ops, num_blocks=st.integers(8, 48), block_size=st.sampled_from([2, 4, 16]),
       budget=st.integers(1, 64), max_num_seqs=st.integers(1, 8), caching=st.booleans())
def test_random_failures(ops, num_blocks, block_size, budget, max_num_seqs, caching):
    """Random adds, aborts, steps and failed steps: a step with suspects runs one of them alone,
    a failed step of one request ends it, the KV bookkeeping holds, and everything finishes."""
    max_model_len = min(num_blocks * block_size, 96)
    kv = KVCacheManager(num_blocks, block_size, caching)
    scheduler = Scheduler(kv, budget, max_num_seqs, max_model_len)
    vocab = 4
    for n, (op, seed) in enumerate(ops):
        rng = random.Random(seed)
        if op == "add":
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, max_model_len))]
            params = SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.3)
            scheduler.add_request(Request(EngineCoreRequest(str(n), prompt, params), frozenset({EOS})))
        elif op == "abort" and scheduler.requests:
            scheduler.abort_requests([rng.choice(sorted(scheduler.requests))])
        elif op == "fail" and scheduler.has_unfinished_requests():
            failed = scheduler.schedule()
            errors = scheduler.recover_from_failed_step(failed, "boom")
            if len(failed.num_scheduled_tokens) == 1:
                assert [out.request_id for out in errors] == list(failed.num_scheduled_tokens)
                assert errors[0].request_id not in scheduler.requests
            else:
                assert not errors and scheduler.suspects >= set(failed.num_scheduled_tokens)
            assert not scheduler.running and kv.num_free_blocks == num_blocks
        elif scheduler.has_unfinished_requests():
            step_alone_if_suspect(scheduler, rng, vocab)
        check_invariants(scheduler, kv)

    rng = random.Random(0)
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        step_alone_if_suspect(scheduler, rng, vocab)
        check_invariants(scheduler, kv)
    assert not scheduler.has_unfinished_requests() and not scheduler.suspects
    assert kv.num_free_blocks == num_blocks


# ---- failures of the workers themselves (injected: no request value triggers them) ----


def lose_one_collect(executor, monkeypatch, call: int = 4) -> None:
    """The executor's `call`-th collect (from 0) loses its results after the device ran the
    step: a transient device error."""
    collect = executor.collect
    calls = iter(range(1_000_000))

    def failing_once():
        result = collect()
        if next(calls) == call:
            raise RuntimeError("transient device error")
        return result

    monkeypatch.setattr(executor, "collect", failing_once)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_failing_once_loses_nothing(tiny_path, prompts, alone, async_scheduling, monkeypatch):
    """A step whose results are lost after the device ran it (a transient error at collect):
    its requests each run alone fine, so none is blamed and every one completes unchanged."""
    llm = LLM(tiny_path, kv_cache_memory=1 << 24, async_scheduling=async_scheduling)
    lose_one_collect(llm.engine.executor, monkeypatch)
    good = {f"g{i}": p for i, p in enumerate(prompts)}
    check(run(llm.engine, {0: greedy(good)}), good, alone, {})


def test_an_engine_failing_every_step_raises(tiny_path, prompts, monkeypatch):
    """When steps fail one after another with none succeeding, the engine is broken rather
    than a request: the error propagates (the engine-core process dies and is restarted)."""
    llm = LLM(tiny_path, kv_cache_memory=1 << 24)
    engine = llm.engine

    def broken(scheduler_output):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.executor, "launch", broken)
    for i in range(MAX_FAILED_STEPS_IN_A_ROW + 2):
        engine.add_request(EngineCoreRequest(f"r{i}", prompts[i % len(prompts)], GREEDY))
    errors = []
    with pytest.raises(RuntimeError, match="device lost"):
        for _ in range(100):
            errors += [out for out in engine.step().outputs if out.finish_reason == FinishReason.ERROR]
    # The first failure hit the batch; each next one a request alone, blamed until the limit.
    assert len(errors) == MAX_FAILED_STEPS_IN_A_ROW - 1


# ---- the engine-core process, over its real sockets ----

SMALL_VOCAB = 16


@pytest.fixture(scope="module")
def small_vocab_path(tmp_path_factory) -> str:
    """A tiny model with fewer tokens than MAX_LOGPROBS."""
    path = tmp_path_factory.mktemp("small-vocab")
    config = transformers.LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_engine_core_process_serves_past_a_bad_request(small_vocab_path, tmp_path):
    """Over the wire the field bounds hold, so the bad request is one validation lets through
    for this model alone: more logprobs than its vocabulary has, which the sampler cannot give."""
    bad = SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS, max_tokens=4)
    try:
        bad.validate(SMALL_VOCAB)
    except ValueError:
        pytest.skip("validation now bounds logprobs by the vocabulary: nothing bad slips through")
    rng = random.Random(3)
    prompts = {f"g{i}": [rng.randrange(SMALL_VOCAB) for _ in range(n)] for i, n in enumerate((40, 9, 23))}
    llm = LLM(small_vocab_path, kv_cache_memory=1 << 24)
    alone = {tuple(p): llm.generate([p], GREEDY)[0].token_ids for p in prompts.values()}

    sockets = tmp_path / "sockets"
    sockets.mkdir()
    ctx = zmq.Context()
    requests, outputs = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    requests.bind(f"ipc://{sockets}/input")
    outputs.bind(f"ipc://{sockets}/output")
    proc = subprocess.Popen([sys.executable, "-m", "engine_core.core_process", f"ipc://{sockets}/input",
                             f"ipc://{sockets}/output"], stdin=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    assert proc.stdin is not None
    try:
        proc.stdin.write(msgspec.json.encode(EngineConfig(model=small_vocab_path, kv_cache_memory=1 << 24)) + b"\n")
        proc.stdin.flush()
        assert requests.poll(120_000), "no handshake"
        identity, ready = requests.recv_multipart()
        msgspec.msgpack.decode(ready, type=EngineReady)

        def add(request_id: str, prompt: list[int], params: SamplingParams) -> None:
            payload = msgspec.msgpack.encode(EngineCoreRequest(request_id, prompt, params))
            requests.send_multipart([identity, RequestType.ADD.value, payload])

        def collect(request_ids: set[str]) -> Outputs:
            collected: Outputs = {r: [] for r in request_ids}
            decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
            while not all(outs and outs[-1][1].finished for outs in collected.values()):
                assert outputs.poll(60_000), "the engine stopped answering"
                message = decoder.decode(outputs.recv())
                assert message.engine_dead is None, message.engine_dead
                for out in message.outputs:
                    collected[out.request_id].append((0, out))
            return collected

        add("g0", prompts["g0"], GREEDY)
        add("bad", [1, 2, 3], bad)
        add("g1", prompts["g1"], GREEDY)
        good = {"g0": prompts["g0"], "g1": prompts["g1"]}
        check(collect({"g0", "g1", "bad"}), good, alone, {"bad": "RuntimeError"})
        add("g2", prompts["g2"], GREEDY)
        check(collect({"g2"}), {"g2": prompts["g2"]}, alone, {})
    finally:
        proc.stdin.close()  # the lifeline: the engine stops
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        requests.close(linger=0)
        outputs.close(linger=0)
        ctx.term()
