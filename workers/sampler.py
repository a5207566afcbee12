"""The sampler: batched logits processing, sampling and logprobs.

Two paths. On CUDA, rows that need no logits processor (plain temperature or greedy) are
sampled by one fused kernel that reads the logits once in the model's dtype
(`kernels.ops.sample_gumbel`). The torch path is the reference and handles everything
(top-k, top-p, min-p, penalties, logit bias, min_tokens bans): every operation is over the
whole [num_reqs, vocab] tensor in float32; per-request Python work is limited to seeded
requests (one noise draw each) and logit biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import ops


@dataclass
class SamplingMetadata:
    """The step's sampling parameters, one row per sampling request."""

    temperature: torch.Tensor  # [B] float32; 0 means greedy (SamplingParams makes tiny ones 0)
    all_greedy: bool
    top_p: torch.Tensor | None  # [B] float32, None when no request uses it
    top_k: torch.Tensor | None  # [B] int64 in [1, vocab], None when no request uses it
    min_p: torch.Tensor | None
    # Seeded rows draw their noise from a generator seeded by (seed, output position), so a
    # request's tokens depend neither on the batch around it nor on preemption. Only rows the
    # torch path samples have one.
    generators: dict[int, torch.Generator]
    # The fused kernel: each row's 64-bit Philox key (seeded rows: from (seed, output
    # position), as their generators; the others: drawn per step). None: the torch path
    # samples every row.
    seeds: torch.Tensor | None  # [B] int64
    # With seeds, the rows that need a processor the fused kernel lacks, which the torch path
    # samples; None when no row does.
    torch_rows: torch.Tensor | None  # [B] bool
    presence_penalty: torch.Tensor | None  # [B]; penalties are None when every row is neutral
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    output_token_counts: torch.Tensor | None  # [B, vocab] float32, with any penalty
    prompt_token_mask: torch.Tensor | None  # [B, vocab] bool, with repetition penalty
    # logit_bias as coordinates: logits[bias_rows, bias_token_ids] += bias_values
    bias_rows: torch.Tensor | None
    bias_token_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    # Stop tokens banned until min_tokens are out: logits[ban_rows, ban_token_ids] = -inf
    ban_rows: torch.Tensor | None
    ban_token_ids: torch.Tensor | None
    max_num_logprobs: int  # -1: no row wants logprobs
    # Structured outputs: the tokens each grammar row may take, packed (see
    # kernels.ops.apply_token_bitmask), and those rows; None when no row has a grammar.
    grammar_bitmask: torch.Tensor | None = None  # [M, ceil(vocab / 32)] int32
    grammar_rows: torch.Tensor | None = None  # [M] int64

    @property
    def has_logits_processors(self) -> bool:
        return any(t is not None for t in (self.bias_rows, self.ban_rows, self.presence_penalty,
                                           self.frequency_penalty, self.repetition_penalty))


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # With logprobs: [B, 1 + k] ids (sampled first) and their logprobs, and the sampled ranks.
    logprob_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    ranks: torch.Tensor | None


def compute_logprobs_rows(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row, the logprob and rank of `token_ids[row]`, followed by the top `num_top`.

    Used for sampled tokens and for prompt tokens alike, so both have the same shapes."""
    token_ids = token_ids.unsqueeze(1)
    token_logprobs = logprobs.gather(1, token_ids)
    ranks = (logprobs > token_logprobs).sum(dim=1) + 1
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=1)
        token_ids = torch.cat((token_ids, top_ids), dim=1)
        token_logprobs = torch.cat((token_logprobs, top_logprobs), dim=1)
    return token_ids, token_logprobs, ranks


class Sampler:
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [B, vocab] in the model's dtype (bfloat16 on a GPU) or float32."""
        # Logprobs are those of the model's raw distribution, as in vLLM and OpenAI.
        raw_logprobs = logits.float().log_softmax(dim=-1) if metadata.max_num_logprobs >= 0 else None
        if metadata.grammar_bitmask is not None:
            # In place: draft verification reads these logits after the sampler.
            ops.apply_token_bitmask(logits, metadata.grammar_bitmask, metadata.grammar_rows)
        if metadata.all_greedy and not metadata.has_logits_processors:
            # Truncation (top-k, top-p, min-p) never changes a greedy row's argmax.
            sampled = logits.argmax(dim=-1)
        elif metadata.seeds is None:
            sampled = self.sample_torch(logits, metadata)
        else:
            sampled = ops.sample_gumbel(logits, metadata.temperature, metadata.seeds)
            if metadata.torch_rows is not None:
                # The torch path runs over the whole batch, whose rows the metadata indexes,
                # and only its rows are kept. Float32 logits it edits in place: the fused
                # kernel, enqueued first, has read them by then.
                sampled = torch.where(metadata.torch_rows, self.sample_torch(logits, metadata), sampled)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = compute_logprobs_rows(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)

    def sample_torch(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        return self.sample(self.apply_logits_processors(logits.float(), md), md)

    @staticmethod
    def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        if md.bias_rows is not None:
            logits.index_put_((md.bias_rows, md.bias_token_ids), md.bias_values, accumulate=True)
        if md.ban_rows is not None:
            logits[md.ban_rows, md.ban_token_ids] = float("-inf")
        if md.repetition_penalty is not None:
            # As in HF/vLLM: divide positive logits, multiply negative ones, for every token
            # seen in the prompt or the output.
            seen = md.prompt_token_mask | (md.output_token_counts > 0)
            penalty = md.repetition_penalty.unsqueeze(1).expand_as(logits)
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalized, logits)
        if md.frequency_penalty is not None:
            logits = logits - md.frequency_penalty.unsqueeze(1) * md.output_token_counts
        if md.presence_penalty is not None:
            logits = logits - md.presence_penalty.unsqueeze(1) * (md.output_token_counts > 0).float()
        return logits

    @staticmethod
    def compute_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The distribution each row samples from, given its processed float32 logits: after
        temperature, top-k, top-p and min-p. Greedy rows get their
        softmax at temperature 1, whose argmax is theirs."""
        is_greedy = md.temperature == 0
        temperature = torch.where(is_greedy, torch.ones_like(md.temperature), md.temperature)
        logits = logits / temperature.unsqueeze(1)
        if md.top_k is not None or md.top_p is not None:
            logits = _apply_top_k_top_p(logits, md.top_k, md.top_p)
        probs = logits.softmax(dim=-1)
        if md.min_p is not None:
            threshold = probs.amax(dim=-1, keepdim=True) * md.min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    @staticmethod
    def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            return greedy
        is_greedy = md.temperature == 0
        probs = Sampler.compute_probs(logits, md)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p, and lets seeded rows
        # draw their own noise while the rest share one batched draw.
        noise = torch.empty_like(probs).exponential_()
        for row, generator in md.generators.items():
            noise[row].exponential_(generator=generator)
        random = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy, random)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass
        # before it already does. The first token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_ids, sorted_logits)
