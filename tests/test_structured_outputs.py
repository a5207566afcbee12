"""Structured outputs in the engine, on the offline LLM: a tiny random Llama with the default
model's tokenizer, so grammars see a real vocabulary while steps stay cheap. Every output
conforms to its grammar; the step modes (SYNC, ASYNC, COLLECT_FIRST) and n-gram speculation
give the same greedy tokens; requests sharing a grammar each keep their own matcher."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers

from engine_core.engine import StepMode
from engine_core.llm import LLM
from engine_core.protocol import SamplingParams, StructuredOutputsParams as Grammar
from tests.test_engine_fault_isolation import lose_one_collect

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "tag": {"enum": ["alpha", "beta", "gamma"]},
    "ok": {"type": "boolean"}}, "required": ["id", "tag", "ok"], "additionalProperties": False}
PHONE = r"[0-9]{3}-[0-9]{4}"
CHOICES = ["yes", "no", "maybe not"]
GRAMMAR = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
CONSTRAINTS = [Grammar(json=json.dumps(SCHEMA)), Grammar(regex=PHONE), Grammar(choice=CHOICES), Grammar(grammar=GRAMMAR)]


def conforms(constraint: Grammar, text: str) -> bool:
    if constraint.json is not None:
        value = json.loads(text)
        return set(value) == {"id", "tag", "ok"} and 0 <= value["id"] <= 999 and value["tag"] in ("alpha", "beta", "gamma")
    if constraint.regex is not None:
        return re.fullmatch(PHONE, text) is not None
    if constraint.choice is not None:
        return text in CHOICES
    return re.fullmatch(r"\([0-9](\+[0-9])*\)", text) is not None


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, default_model_dir) -> str:
    """A random two-layer Llama over SmolLM2's vocabulary, with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-smollm")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return str(path)


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, kv_cache_memory=1 << 26, max_model_len=256)


def requests(llm: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each constraint on two prompts, and two unconstrained requests among them."""
    prompts = [llm.tokenizer.encode(f"Request {i}: answer in the format asked.") for i in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=c) for c in CONSTRAINTS * 2]
    params += [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2
    return prompts, params


def test_greedy_outputs_conform_and_agree_across_step_modes(llm):
    prompts, params = requests(llm)
    by_mode = {}
    for mode in (StepMode.SYNC, StepMode.ASYNC, StepMode.COLLECT_FIRST):
        llm.engine.set_step_mode(mode)
        by_mode[mode] = llm.generate(prompts, params)
    llm.engine.set_step_mode(StepMode.SYNC)
    sync = by_mode[StepMode.SYNC]
    for out, p in zip(sync, params):
        if p.structured_outputs is not None:
            assert out.finish_reason == "stop", out
            assert conforms(p.structured_outputs, out.text), (p.structured_outputs, out.text)
    for mode, outs in by_mode.items():
        assert [o.token_ids for o in outs] == [o.token_ids for o in sync], mode


def test_grammar_masks_reach_worker_processes(model_path, llm):
    """Over a worker process the masks travel in a SAMPLE message of their own, after the
    step's launch: the same tokens as in-process, async scheduling on."""
    prompts, params = requests(llm)
    llm.engine.set_step_mode(StepMode.ASYNC)
    try:
        expected = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.engine.set_step_mode(StepMode.SYNC)
    remote = LLM(model_path, kv_cache_memory=1 << 26, max_model_len=256, distributed_executor_backend="mp")
    try:
        remote.engine.set_step_mode(StepMode.ASYNC)
        assert [o.token_ids for o in remote.generate(prompts, params)] == expected
    finally:
        remote.engine.shutdown()


def test_a_step_failing_once_under_grammars_loses_nothing(llm, monkeypatch):
    """In ASYNC mode a grammar step is launched after the step in flight is collected. A
    collect that fails there drops the scheduled step unlaunched (the recovery preempted its
    requests); once the suspects' steps succeed, grammar steps launch again: the tokens are
    those of a run without the failure."""
    prompts, params = requests(llm)
    # Constrained requests only: the suspects' lone steps then all sample under grammars.
    prompts, params = prompts[:len(CONSTRAINTS) * 2], params[:len(CONSTRAINTS) * 2]
    llm.engine.set_step_mode(StepMode.ASYNC)
    try:
        expected = [o.token_ids for o in llm.generate(prompts, params)]
        recover = llm.engine._recover
        failed_steps = []

        def recording_recover(failed, error):
            failed_steps.append(error)
            return recover(failed, error)

        lose_one_collect(llm.engine.executor, monkeypatch)
        monkeypatch.setattr(llm.engine, "_recover", recording_recover)
        outputs = llm.generate(prompts, params)
    finally:
        llm.engine.set_step_mode(StepMode.SYNC)
    assert [o.token_ids for o in outputs] == expected
    assert [str(e) for e in failed_steps] == ["transient device error"]  # no step failed after it


def test_requests_sharing_a_grammar_sample_each_under_its_own_matcher(llm):
    """As the frontend fans out n > 1: one grammar, several seeded samples at once; each
    conforms, and the grammar is built once (the others copy it from the cache)."""
    prompt = llm.tokenizer.encode("Pick some numbers.")
    constraint = Grammar(regex=r"[0-9]{2}:[0-9]{2}")  # one no other test builds
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=constraint) for i in range(6)]
    stats = []
    engine_step = llm.engine.step

    def step():
        outputs = engine_step()
        stats.append(outputs.scheduler_stats)
        return outputs

    llm.engine.step = step
    try:
        outs = llm.generate([prompt] * 6, params)
    finally:
        del llm.engine.step
    texts = [o.text for o in outs]
    assert all(re.fullmatch(constraint.regex, t) for t in texts), texts
    assert len(set(texts)) > 1, texts  # they sampled apart
    assert sum(s.grammar_cache_misses for s in stats) == 1
    assert sum(s.grammar_cache_hits for s in stats) == 5


def test_a_grammar_that_cannot_be_built_fails_its_request_alone(llm):
    prompt = llm.tokenizer.encode("Hello")
    bad = SamplingParams(temperature=0, max_tokens=8, structured_outputs=Grammar(regex="[0-9"))
    good = SamplingParams(temperature=0, max_tokens=16, structured_outputs=Grammar(regex=PHONE))
    outs = llm.generate([prompt, prompt], [bad, good])
    assert outs[0].finish_reason == "error" and "unclosed character class" in outs[0].error
    assert outs[1].finish_reason == "stop" and conforms(good.structured_outputs, outs[1].text)


def test_ngram_speculation_under_a_grammar_matches_no_speculation(model_path):
    """Drafts the grammar refuses are trimmed or rejected; the matcher advances only by the
    tokens kept: float32 greedy tokens equal those without speculation."""
    instance = '{"id":123,"tag":"beta","ok":true}'
    plain = LLM(model_path, kv_cache_memory=1 << 26, max_model_len=256, dtype="float32")
    prompts = [plain.tokenizer.encode(f"{instance} {instance} {i} {instance[:i]}") for i in range(1, 9)]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=c) for c in CONSTRAINTS * 2]
    expected = plain.generate(prompts, params)
    spec = LLM(model_path, kv_cache_memory=1 << 26, max_model_len=256, dtype="float32",
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                   "prompt_lookup_max": 3})
    drafts = []
    engine_step = spec.engine.step

    def step():
        outputs = engine_step()
        drafts.append(outputs.scheduler_stats.spec_num_draft_tokens)
        return outputs

    spec.engine.step = step
    got = spec.generate(prompts, params)
    assert sum(drafts) > 0  # speculation ran
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for out, p in zip(got, params):
        assert conforms(p.structured_outputs, out.text), out.text


def test_a_sampled_token_the_grammar_refuses_ends_only_its_request(model_path):
    """The masks should make it impossible; if a bug lets one through, that request ends with an
    internal error and the others go on (the engine does not die)."""
    from tokenizers import Tokenizer

    from engine_core.kv_cache_manager import KVCacheManager
    from engine_core.protocol import EngineCoreRequest, FinishReason, ModelRunnerOutput
    from engine_core.request import Request
    from engine_core.scheduler import Scheduler
    from engine_core.structured_output import StructuredOutputManager

    eos = frozenset([2])
    manager = StructuredOutputManager(model_path, 49152, list(eos))
    scheduler = Scheduler(KVCacheManager(64, 16, True), 256, 8, 256, None, manager)
    constrained = SamplingParams(temperature=0, max_tokens=8, structured_outputs=Grammar(choice=CHOICES))
    scheduler.add_request(Request(EngineCoreRequest("constrained", [5, 6, 7], constrained), eos))
    scheduler.add_request(Request(EngineCoreRequest("free", [5, 6, 7], SamplingParams(max_tokens=8)), eos))
    scheduler.requests["constrained"].grammar.result(timeout=60)
    step = scheduler.schedule()
    assert list(step.num_scheduled_tokens) == ["constrained", "free"] and step.grammar_request_ids == ["constrained"]
    assert scheduler.start_grammar_bitmask(step).result().shape == (1, -(-49152 // 32))  # the constrained row
    [refused] = Tokenizer.from_file(f"{model_path}/tokenizer.json").encode("Z").ids  # no choice starts so

    outputs = {o.request_id: o for o in scheduler.update_from_output(
        step, ModelRunnerOutput(request_ids=["constrained", "free"], sampled_token_ids=[[refused], [refused]]))}

    assert outputs["constrained"].finish_reason == FinishReason.ERROR and outputs["constrained"].error_is_internal
    assert f"refused sampled token {refused}" in outputs["constrained"].error
    assert outputs["free"].finish_reason is None and outputs["free"].new_token_ids == [refused]
    assert list(scheduler.requests) == ["free"]
    manager.shutdown()
