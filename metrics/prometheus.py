"""Prometheus metrics under `octavo:`, named as vLLM's so its dashboards and autoscalers carry
over with a prefix change; `compat="vllm"` also exports them under vLLM's own names.

Every metric lives in the logger's own CollectorRegistry (never the process-global one), so
two apps in one process, or one test after another, never share or clash over metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from metrics.stats import FINISH_REASONS, IterationStats, SchedulerStats

PREFIX = "octavo:"
COMPAT_CHOICES = ("vllm",)

# Buckets span a GPU's milliseconds and a CPU's seconds: a 135M model decodes in ~2 ms a
# token on a GPU and ~30 ms on a laptop core; prefill of long prompts takes seconds on a CPU.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                           15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# vLLM's names where they are not just the prefix swapped: its histogram of step sizes
# carries `_total` in the name, and its older names still drive many dashboards.
_VLLM_EXTRA_NAMES = {
    "iteration_tokens": ("iteration_tokens_total",),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "prefix_cache_queries": ("prefix_cache_queries", "gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("prefix_cache_hits", "gpu_prefix_cache_hits"),
    "inter_token_latency_seconds": ("inter_token_latency_seconds", "time_per_output_token_seconds"),
}


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: token counts from 1 to the context length."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class PrometheusStatLogger:
    def __init__(self, model_name: str, max_model_len: int, cache_config: dict[str, str],
                 num_speculative_tokens: int = 0, compat: str | None = None) -> None:
        if compat is not None and compat not in COMPAT_CHOICES:
            raise ValueError(f"metrics compat must be one of {COMPAT_CHOICES}, got {compat!r}")
        self.registry = CollectorRegistry()
        self._families: dict[str, MetricWrapperBase] = {}  # by name without the prefix
        self._model_name = model_name

        self.running = self._gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = self._gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = 100%).")
        self.prefix_cache_queries = self._counter("prefix_cache_queries", "Prefix cache lookups, in tokens.")
        self.prefix_cache_hits = self._counter("prefix_cache_hits", "Prefix cache hits, in tokens.")
        self.preemptions = self._counter("num_preemptions", "Requests preempted (KV cache full).")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of requests whose prefill finished.")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self.engine_restarts = self._counter("engine_restarts", "Engine-core processes started after one died.")
        success = self._family(Counter, "request_success", "Finished requests by finish reason.",
                               ("model_name", "finished_reason"))
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Time between a request's tokens.", ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to finish of completed requests.",
                                   REQUEST_LATENCY_BUCKETS)
        self.queue_time = self._histogram("request_queue_time_seconds", "Arrival to first scheduling.",
                                          REQUEST_LATENCY_BUCKETS)
        self.prefill_time = self._histogram("request_prefill_time_seconds", "First scheduling to first token.",
                                            REQUEST_LATENCY_BUCKETS)
        self.decode_time = self._histogram("request_decode_time_seconds", "First token to last token.",
                                           REQUEST_LATENCY_BUCKETS)
        self.inference_time = self._histogram("request_inference_time_seconds",
                                              "First scheduling to last token.", REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens per completed request.",
                                                     token_buckets)
        self.request_generation_tokens = self._histogram("request_generation_tokens",
                                                         "Generated tokens per completed request.", token_buckets)
        self.iteration_tokens = self._histogram("iteration_tokens", "Tokens the engine ran per step.",
                                                ITERATION_TOKENS_BUCKETS)
        self.grammar_compile_seconds = self._counter(
            "structured_output_compile_seconds", "Seconds spent building grammars (structured outputs).")
        self.grammar_cache_hits = self._counter("structured_output_cache_hits", "Grammars taken from the cache.")
        self.grammar_cache_misses = self._counter("structured_output_cache_misses", "Grammars built anew.")
        self.spec_drafts = self._counter("spec_decode_num_drafts", "Speculative decoding drafts proposed.")
        self.spec_draft_tokens = self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted_tokens = self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        per_pos = self._family(Counter, "spec_decode_num_accepted_tokens_per_pos",
                               "Draft tokens accepted, by position in the draft.", ("model_name", "position"))
        self.spec_accepted_per_pos = [per_pos.labels(model_name, str(i)) for i in range(num_speculative_tokens)]
        info = self._family(Gauge, "cache_config_info", "KV cache configuration (the labels; value 1).",
                            ("model_name", *cache_config))
        info.labels(model_name, *cache_config.values()).set(1)

        if compat == "vllm":
            renames = {PREFIX + name: ["vllm:" + alias for alias in _VLLM_EXTRA_NAMES.get(name, (name,))]
                       for name in self._families}
            self.registry.register(_RenamedCollector(list(self._families.values()), renames))

    def _family(self, cls: type[MetricWrapperBase], name: str, documentation: str,
                labelnames: tuple[str, ...] = ("model_name",), **kwargs: object) -> MetricWrapperBase:
        family = cls(PREFIX + name, documentation, labelnames, registry=self.registry, **kwargs)
        self._families[name] = family
        return family

    # Children are made up front, so every series exists (at 0) from the first scrape and
    # rate() sees the first increment.
    def _gauge(self, name: str, documentation: str) -> Gauge:
        return self._family(Gauge, name, documentation).labels(self._model_name)

    def _counter(self, name: str, documentation: str) -> Counter:
        return self._family(Counter, name, documentation).labels(self._model_name)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
        return self._family(Histogram, name, documentation, buckets=buckets).labels(self._model_name)

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        if scheduler_stats is not None:
            self._record_scheduler(scheduler_stats)
        if iteration.num_prompt_tokens:
            self.prompt_tokens.inc(iteration.num_prompt_tokens)
        if iteration.num_generation_tokens:
            self.generation_tokens.inc(iteration.num_generation_tokens)
        for ttft in iteration.time_to_first_tokens:
            self.ttft.observe(ttft)
        for itl in iteration.inter_token_latencies:
            self.itl.observe(itl)
        for request in iteration.finished_requests:
            self.request_success[request.finish_reason].inc()
            if not request.completed:
                continue
            self.e2e.observe(request.e2e_latency)
            self.queue_time.observe(request.queue_time)
            self.prefill_time.observe(request.prefill_time)
            self.decode_time.observe(request.decode_time)
            self.inference_time.observe(request.inference_time)
            self.request_prompt_tokens.observe(request.num_prompt_tokens)
            self.request_generation_tokens.observe(request.num_generation_tokens)

    def _record_scheduler(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.num_batched_tokens:
            self.iteration_tokens.observe(stats.num_batched_tokens)
        # Counters move only when there is something to add: most steps add nothing here.
        for counter, value in ((self.prefix_cache_queries, stats.prefix_cache_queries),
                               (self.prefix_cache_hits, stats.prefix_cache_hits),
                               (self.preemptions, stats.num_preemptions),
                               (self.spec_drafts, stats.spec_num_drafts),
                               (self.spec_draft_tokens, stats.spec_num_draft_tokens),
                               (self.spec_accepted_tokens, stats.spec_num_accepted_tokens),
                               (self.grammar_compile_seconds, stats.grammar_compile_seconds),
                               (self.grammar_cache_hits, stats.grammar_cache_hits),
                               (self.grammar_cache_misses, stats.grammar_cache_misses)):
            if value:
                counter.inc(value)
        for counter, value in zip(self.spec_accepted_per_pos, stats.spec_num_accepted_tokens_per_pos):
            if value:
                counter.inc(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RenamedCollector(Collector):
    """Re-exports metric families under other names when scraped, so a compat name costs
    nothing while tokens flow."""

    def __init__(self, sources: list[MetricWrapperBase], renames: dict[str, list[str]]) -> None:
        self._sources = sources
        self._renames = renames

    def collect(self) -> list[Metric]:
        renamed = []
        for source in self._sources:
            for family in source.collect():
                for name in self._renames[family.name]:
                    copy = Metric(name, family.documentation, family.type, family.unit)
                    copy.samples = [_rename(sample, family.name, name) for sample in family.samples]
                    renamed.append(copy)
        return renamed


def _rename(sample: Sample, old_family: str, new_family: str) -> Sample:
    # Sample names are the family's plus a suffix (_total, _bucket, _count, _sum, _created).
    return sample._replace(name=new_family + sample.name[len(old_family):])
