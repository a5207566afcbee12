"""What a load run replays: prompts with the number of tokens each should generate.

- `synthetic`: random token ids, lengths uniform around a mean (vLLM's `random` dataset:
  `[len * (1 - r), len * (1 + r)]`), so runs are exactly sized and never hit the prefix cache
  by accident. Token ids go to /v1/completions as they are; chat needs text, which the
  server's /detokenize makes from them.
- `prompts`: real English prompts shipped in `data/prompts.jsonl` (chat questions and
  summarization requests of 10 to 700 tokens) with a typical answer length each.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("data") / "prompts.jsonl"
# Random prompt ids stay clear of the low ids where tokenizers keep their special tokens, and
# below every vocabulary we serve (SmolLM2: 49152).
SYNTHETIC_ID_RANGE = (1000, 30000)


@dataclass(frozen=True)
class Prompt:
    text: str | None  # set for real text; None for synthetic prompts until made into text
    token_ids: list[int] | None  # set for synthetic prompts
    output_len: int  # max_tokens; exactly this many tokens with ignore_eos


def synthetic(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0) -> list[Prompt]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio))))

    prompts = []
    for _ in range(num):
        ids = [rng.randrange(*SYNTHETIC_ID_RANGE) for _ in range(length(input_len))]
        prompts.append(Prompt(None, ids, length(output_len)))
    return prompts


def real_prompts(num: int, seed: int = 0, output_len: int | None = None) -> list[Prompt]:
    """`num` prompts drawn from the shipped set (cycled, shuffled with `seed`); `output_len`
    overrides each prompt's own answer length."""
    with open(PROMPTS_FILE) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    order: list[dict] = []
    while len(order) < num:
        batch = rows[:]
        rng.shuffle(batch)
        order += batch
    return [Prompt(row["prompt"], None, output_len or row["output_len"]) for row in order[:num]]
