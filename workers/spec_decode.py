"""Speculative decoding on the worker: where each request's drafts sit among the step's
sampled rows, and their verification.

A request with k drafts runs k + 1 query tokens (its last token, then the drafts) and samples
at each: row j of its logits is the target's distribution after draft j - 1. Drafts are
accepted left to right by the rejection sampler, and the request emits the accepted ones plus
one token: the sample at the first rejected position, or the row after the last draft when
none is rejected. The proposers (n-gram lookup, draft model) treat their drafts as
deterministic, so the rejection test keeps the target distribution exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from kernels import ops
from workers.sampler import Sampler, SamplingMetadata
from workers.step_inputs import StepInputs


class DraftProposer(Protocol):
    def prepare(self, inputs: StepInputs, max_query_len: int) -> None:
        """Called with every target forward's inputs (a draft model keeps its KV in step)."""

    def capture_graphs(self) -> None:
        """Capture CUDA graphs of the proposer's own forwards, if it has any."""

    def propose(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                max_num_draft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drafts for `rows` of the batch ([n, k], padded with -1) and their counts ([n])."""


@dataclass
class SpecLayout:
    """Where each sampling request's logits rows are, when some of them verify drafts."""

    num_draft: np.ndarray  # [B] drafts per sampling request
    num_logits: np.ndarray  # [B] 1 + num_draft
    cu_num_logits: np.ndarray  # [B] each request's first logits row
    index_in_request: np.ndarray  # [N] position j of each logits row within its request
    draft_logits_index: np.ndarray  # [T] the logits row of each draft (the row that verifies it)
    padded_index: np.ndarray  # [B, K + 1] request b's logits rows, -1 past its own
    max_num_draft: int  # K

    @staticmethod
    def build(num_draft: np.ndarray) -> SpecLayout:
        num_logits = num_draft + 1
        ends = np.cumsum(num_logits)
        starts = ends - num_logits
        index_in_request = np.arange(ends[-1]) - np.repeat(starts, num_logits)
        is_draft_row = index_in_request < np.repeat(num_draft, num_logits)
        max_num_draft = int(num_draft.max())
        j = np.arange(max_num_draft + 1)
        padded_index = np.where(j <= num_draft[:, None], starts[:, None] + j, -1)
        return SpecLayout(num_draft, num_logits, starts, index_in_request,
                          np.flatnonzero(is_draft_row), padded_index, max_num_draft)


def accept_greedy(sampled: np.ndarray, draft_token_ids: np.ndarray, layout: SpecLayout) -> np.ndarray:
    """Each request's new tokens, [B, K + 1] padded with -1, for greedy requests, on the host
    once the sampled ids are there: a draft is accepted while it equals the argmax the sampler
    took at its position, and the argmax at the first mismatch, or after the last draft, ends
    the run. (Cheaper than a dozen tiny kernels and copies at the small batches where
    speculation pays.)

    sampled: [N], the argmax at every logits row; draft_token_ids: [T]."""
    k = layout.max_num_draft
    tokens = np.where(layout.padded_index >= 0, sampled[layout.padded_index], -1)
    drafts = np.full((len(layout.num_draft), k), -1, dtype=np.int64)
    request_of_draft = np.repeat(np.arange(len(layout.num_draft)), layout.num_draft)
    drafts[request_of_draft, layout.index_in_request[layout.draft_logits_index]] = draft_token_ids
    num_accepted = np.cumprod(tokens[:, :k] == drafts, axis=1).sum(axis=1)
    return np.where(np.arange(k + 1) <= num_accepted[:, None], tokens, -1)


def verify_drafts(logits: torch.Tensor, metadata: SamplingMetadata, sampled: torch.Tensor,
                  layout: SpecLayout, draft_token_ids: torch.Tensor, keys: torch.Tensor,
                  to_device: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
    """Each request's new tokens, [B, K + 1] padded with -1, by the rejection sampler (greedy
    and sampled requests alike).

    logits: [N, vocab], a row per position sampled; sampled: [N], the sampler's token at each
    (for greedy rows the argmax); draft_token_ids: [T]; keys: [B] random keys."""
    draft_rows = to_device(layout.draft_logits_index)
    target_probs = Sampler.compute_probs(logits[draft_rows].float(), _select(metadata, draft_rows))
    bonus_rows = to_device(layout.cu_num_logits + layout.num_draft)  # each request's row after its drafts
    cu_num_draft = np.concatenate(([0], np.cumsum(layout.num_draft))).astype(np.int32)
    return ops.rejection_sample(draft_token_ids, to_device(cu_num_draft), target_probs, None,
                                sampled[bonus_rows], metadata.temperature[bonus_rows] == 0,
                                keys, layout.max_num_draft)


def emitted_per_row(tokens: torch.Tensor, layout: SpecLayout,
                    to_device: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
    """The token each logits row ended up emitting (0 where it emitted none), for logprobs."""
    request_of_row = np.repeat(np.arange(len(layout.num_draft)), layout.num_logits)
    return tokens[to_device(request_of_row), to_device(layout.index_in_request)].clamp(min=0)


def _select(metadata: SamplingMetadata, rows: torch.Tensor) -> SamplingMetadata:
    """The metadata of some rows, for the distribution of positions that verify drafts (rows
    with logits processors never speculate, so only truncation and temperature apply)."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows]

    return dataclasses.replace(metadata, temperature=metadata.temperature[rows], top_p=pick(metadata.top_p),
                               top_k=pick(metadata.top_k), min_p=pick(metadata.min_p))
