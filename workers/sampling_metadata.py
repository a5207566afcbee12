"""A step's SamplingMetadata, gathered from the persistent batch's per-row parameters.

A metadata row per logits row: a request verifying drafts has one per position it samples.
Every array the sampler reads goes to the device in one copy; an array no row of the step uses
stays None, so that the sampler skips its processor.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.input_batch import InputBatch
from workers.sampler import SamplingMetadata
from workers.upload import upload

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits
_PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")

HostArrays = dict[str, np.ndarray | None]


def seed_keys(seeds: np.ndarray, num_output: np.ndarray, offset: int = 0) -> np.ndarray:
    """The random keys of seeded requests' samples at their output positions, (seed + offset
    + num_output * _SEED_MIX) mod 2**63: a request's tokens then depend neither on the batch
    around it nor on preemption. Computed modulo 2**64 in uint64 (2**63 divides it), so a seed
    anywhere in int64 works."""
    with np.errstate(over="ignore"):
        keys = seeds.astype(np.uint64) + np.uint64(offset) + num_output.astype(np.uint64) * np.uint64(_SEED_MIX)
    return (keys & np.uint64((1 << 63) - 1)).astype(np.int64)


def _random_keys(num_rows: int) -> np.ndarray:
    return torch.randint(0, (1 << 63) - 1, (num_rows,), dtype=torch.int64).numpy()


class SamplingMetadataBuilder:
    def __init__(self, batch: InputBatch, vocab_size: int, device: torch.device) -> None:
        self.batch = batch
        self.vocab_size = vocab_size
        self.device = device

    def build(self, rows: np.ndarray, seq_lens: np.ndarray, penalized: np.ndarray) -> SamplingMetadata:
        """rows: each logits row's batch row; seq_lens: its tokens up to the one it samples
        after (output counts derive from them rather than from the host's tokens, which may lag
        a step in flight); penalized: `batch.penalized[rows]`, whose host tokens must be
        complete, as penalties count them."""
        b = self.batch
        num_output = seq_lens - b.num_prompt_tokens[rows]
        temperature = b.temperature[rows]
        greedy = temperature == 0
        truncation, truncated = self._truncation(rows)
        edits, edited_rows = self._logit_edits(rows, num_output)
        # On CUDA the fused kernel samples the rows that need no logits processor; truncation
        # (top-k, top-p, min-p) never changes a greedy row's argmax.
        needs_torch = penalized | (~greedy & truncated)
        needs_torch[edited_rows] = True
        all_greedy = bool(greedy.all())
        # An all-greedy batch without logits processors takes the argmax and draws nothing.
        fused = self.device.type == "cuda" and not needs_torch.all() and not all_greedy
        seeds, generators = self._seeds(rows, num_output, fused, needs_torch)
        output_counts, prompt_mask = self._token_counts(rows) if penalized.any() else (None, None)
        arrays = {"temperature": temperature, **truncation, **self._penalties(rows, penalized), **edits,
                  "seeds": seeds, "torch_rows": needs_torch if fused and needs_torch.any() else None}
        return SamplingMetadata(all_greedy=all_greedy, generators=generators, output_token_counts=output_counts,
                                prompt_token_mask=prompt_mask, max_num_logprobs=int(b.num_logprobs[rows].max()),
                                **self._upload(arrays))

    def request_keys(self, rows: np.ndarray, seq_lens: np.ndarray) -> torch.Tensor:
        """A Philox key per request for the rejection sampler: from the seed and the output
        position of its first draft for seeded requests, drawn afresh for the others."""
        b = self.batch
        keys = _random_keys(len(rows))
        seeded = b.seeded[rows]
        if seeded.any():
            # Offset from the sampler's keys of the same positions, so the two draw apart.
            num_output = seq_lens[seeded] - b.num_prompt_tokens[rows[seeded]]
            keys[seeded] = seed_keys(b.seed[rows[seeded]], num_output, offset=1)
        return upload([keys], self.device)[0]

    def _truncation(self, rows: np.ndarray) -> tuple[HostArrays, np.ndarray]:
        """top-p, top-k and min-p, and which rows truncate their distribution at all."""
        b = self.batch
        top_k, top_p, min_p = b.top_k[rows], b.top_p[rows], b.min_p[rows]
        uses_top_k = (top_k > 0) & (top_k < self.vocab_size)
        uses_top_p = top_p < 1.0
        arrays = {"top_p": top_p if uses_top_p.any() else None,
                  "top_k": np.where(uses_top_k, top_k, self.vocab_size) if uses_top_k.any() else None,
                  "min_p": min_p if min_p.any() else None}
        return arrays, uses_top_k | uses_top_p | (min_p > 0)

    def _penalties(self, rows: np.ndarray, penalized: np.ndarray) -> HostArrays:
        if not penalized.any():
            return dict.fromkeys(_PENALTIES)
        b = self.batch
        presence, frequency, repetition = (b.presence_penalty[rows], b.frequency_penalty[rows],
                                           b.repetition_penalty[rows])
        return {"presence_penalty": presence if presence.any() else None,
                "frequency_penalty": frequency if frequency.any() else None,
                "repetition_penalty": repetition if (repetition != 1.0).any() else None}

    def _logit_edits(self, rows: np.ndarray, num_output: np.ndarray) -> tuple[HostArrays, list[int]]:
        """logit_bias, and the stop tokens banned until min_tokens are out, as coordinates into
        the step's logits; and the logits rows they edit."""
        b = self.batch
        bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
        if b.logit_bias or b.stop_token_ids:
            # Rows with edits never speculate: each has a single logits row.
            row_of = {int(r): i for i, r in enumerate(rows)}
            for row, bias in b.logit_bias.items():
                if row in row_of:
                    bias_rows += [row_of[row]] * len(bias)
                    bias_ids += list(bias)
                    bias_values += list(bias.values())
            for row, stop_ids in b.stop_token_ids.items():
                if row in row_of and num_output[row_of[row]] < b.min_tokens[row]:
                    ban_rows += [row_of[row]] * len(stop_ids)
                    ban_ids += stop_ids
        arrays = {"bias_rows": np.array(bias_rows, dtype=np.int64) if bias_rows else None,
                  "bias_token_ids": np.array(bias_ids, dtype=np.int64) if bias_rows else None,
                  "bias_values": np.array(bias_values, dtype=np.float32) if bias_rows else None,
                  "ban_rows": np.array(ban_rows, dtype=np.int64) if ban_rows else None,
                  "ban_token_ids": np.array(ban_ids, dtype=np.int64) if ban_rows else None}
        return arrays, bias_rows + ban_rows

    def _seeds(self, rows: np.ndarray, num_output: np.ndarray, fused: bool, needs_torch: np.ndarray
               ) -> tuple[np.ndarray | None, dict[int, torch.Generator]]:
        """The fused kernel's key per row (None without the kernel), and generators for the
        seeded rows the torch path samples."""
        b = self.batch
        # One draw for every row's key; seeded rows' keys are overwritten below.
        seeds = _random_keys(len(rows)) if fused else None
        generators: dict[int, torch.Generator] = {}
        seeded = b.seeded[rows]
        if not seeded.any():
            return seeds, generators
        # A request verifying drafts has a row per position, each seeded by its own position.
        keys = seed_keys(b.seed[rows], num_output)
        if fused:
            seeds[seeded] = keys[seeded]
        for i in np.flatnonzero(seeded & needs_torch if fused else seeded):
            # The sampler draws after all rows are seeded: a request's later rows need
            # generators of their own.
            row = int(rows[i])
            generator = b.generators[row] if i == 0 or rows[i - 1] != row else torch.Generator(self.device)
            generator.manual_seed(int(keys[i]))
            generators[i] = generator
        return seeds, generators

    def _token_counts(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: how often each vocab token occurs in the output, and which occur in the prompt."""
        b = self.batch
        width = int(b.num_tokens[rows].max())
        tokens, num_prompt, num_tokens = upload([b.token_ids[rows, :width], b.num_prompt_tokens[rows, None],
                                                 b.num_tokens[rows, None]], self.device)
        pos = torch.arange(width, device=self.device).unsqueeze(0)
        is_output = (pos >= num_prompt) & (pos < num_tokens)
        counts = torch.zeros(len(rows), self.vocab_size, device=self.device)
        counts.scatter_add_(1, tokens, is_output.float())
        prompt_mask = torch.zeros(len(rows), self.vocab_size, device=self.device)
        prompt_mask.scatter_add_(1, tokens, (pos < num_prompt).float())
        return counts, prompt_mask > 0

    def _upload(self, arrays: HostArrays) -> dict[str, torch.Tensor | None]:
        """The arrays on the device, in one copy; None stays None."""
        used = [name for name, array in arrays.items() if array is not None]
        on_device = dict(zip(used, upload([arrays[name] for name in used], self.device)))
        return {name: on_device.get(name) for name in arrays}
