"""Accuracy of each quantized format against the unquantized model: the mean KL divergence of
next-token distributions (KL(reference || quantized), nats) over every position of a fixed
prompt set, and how often the two agree on the top-1 (greedy) token.

    python -m load_tests.quant_accuracy                          # the default model, CPU or GPU
    python -m load_tests.quant_accuracy --shape qwen3-0.6b       # random weights in a real shape
    python -m load_tests.quant_accuracy --model DIR --formats fp8-kv fp8 awq

Formats: `fp8-kv` (--kv-cache-dtype fp8), `fp8` (--quantization fp8 on the fly), and the
checkpoint formats of load_tests.quant_checkpoints (awq, gptq, gptq-asym, fp8-channel,
fp8-tensor-static, fp8-block), written from the model by round-to-nearest. The reference is the
unquantized model in the same dtype (float32 on the CPU, bfloat16 on a GPU); prompts are
load_tests/data/prompts.jsonl through the model's tokenizer, or fixed random ids without one.
`--generate N` appends the reference's greedy continuation of N tokens to each prompt (through
Octavo's engine) and reports those positions apart: the distributions a user's decode sees,
where a prompt's first positions are the model's least certain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from load_tests.quant_checkpoints import FORMATS as CHECKPOINT_FORMATS
from load_tests.quant_checkpoints import write_quantized

ONLINE_FORMATS = ("fp8-kv", "fp8")
PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class Accuracy:
    mean_kl: float
    top1_agreement: float
    num_positions: int
    generated: Accuracy | None = None  # the positions of the greedy continuations alone


def prompt_token_ids(model_dir: Path, num_prompts: int, max_len: int, vocab_size: int) -> list[list[int]]:
    if any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:num_prompts]]
        return [tokenizer(text)["input_ids"][:max_len] for text in texts]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (max_len,), generator=gen).tolist() for _ in range(num_prompts)]


@torch.inference_mode()
def prompt_logits(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype, device: torch.device,
                  quantization: str | None = None, kv_cache_dtype: str = "auto", block_size: int = 16,
                  dummy: bool = False) -> list[torch.Tensor]:
    """Float32 logits [len, vocab] at every position of each prompt, prefilled in one step
    through Octavo's model and paged KV cache (which the attention reads back)."""
    from workers.attention import AttentionMetadata
    from workers.model_loader import load_model
    from workers.quantization.kv_cache import kv_cache_dtype as resolve_kv_dtype

    model = load_model(model_dir, dtype, device, dummy=dummy, quantization=quantization)
    cache_dtype = resolve_kv_dtype(kv_cache_dtype, dtype, device)
    max_len = max(len(p) for p in prompts)
    num_blocks = -(-max_len // block_size)
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                     dtype=cache_dtype, device=device)
    block_table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    logits = []
    for tokens in prompts:
        n = len(tokens)
        positions = torch.arange(n, device=device)
        metadata = AttentionMetadata(slot_mapping=positions.clone(),
                                     query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
                                     seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
                                     block_tables=block_table)
        hidden = model(torch.tensor(tokens, device=device), positions, metadata)
        logits.append(model.compute_logits(hidden).float().cpu())
    return logits


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor], prompt_lens: list[int] | None = None
            ) -> Accuracy:
    """Over every position; with prompt_lens, also over those predicting a continuation's tokens."""
    ref, quant = torch.cat(reference), torch.cat(quantized)
    ref_logp, quant_logp = ref.log_softmax(-1), quant.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - quant_logp)).sum(-1)
    agree = (ref.argmax(-1) == quant.argmax(-1)).float()
    generated = None
    if prompt_lens is not None:
        generated = compare([r[n - 1:-1] for r, n in zip(reference, prompt_lens)],
                            [q[n - 1:-1] for q, n in zip(quantized, prompt_lens)])
    return Accuracy(float(kl.mean()), float(agree.mean()), len(ref), generated)


def greedy_continuations(model_dir: Path, prompts: list[list[int]], num_tokens: int, dtype: torch.dtype
                         ) -> list[list[int]]:
    """Each prompt followed by the unquantized model's greedy continuation (up to its EOS)."""
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    llm = LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."))
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=num_tokens))
    finally:
        llm.engine.shutdown()
    return [prompt + output.token_ids for prompt, output in zip(prompts, outputs)]


def evaluate(model_dir: Path, formats: list[str], dtype: torch.dtype, device: torch.device,
             num_prompts: int = 8, max_len: int = 64, group_size: int = 128,
             work_dir: Path | None = None, generate: int = 0) -> dict[str, Accuracy]:
    """Accuracy of each format against `model_dir` unquantized."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    prompts = prompt_token_ids(model_dir, num_prompts, max_len, vocab_size)
    prompt_lens = [len(p) for p in prompts] if generate else None
    if generate:
        prompts = greedy_continuations(model_dir, prompts, generate, dtype)
    reference = prompt_logits(model_dir, prompts, dtype, device)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="quant-accuracy-"))
    results = {}
    for fmt in formats:
        if fmt == "fp8-kv":
            logits = prompt_logits(model_dir, prompts, dtype, device, kv_cache_dtype="fp8")
        elif fmt == "fp8":
            logits = prompt_logits(model_dir, prompts, dtype, device, quantization="fp8")
        else:
            write_quantized(model_dir, work_dir / fmt, fmt, group_size)
            logits = prompt_logits(work_dir / fmt, prompts, dtype, device)
        results[fmt] = compare(reference, logits, prompt_lens)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a 16/32-bit checkpoint directory (default: the embedded default model)")
    parser.add_argument("--shape", help="instead, random weights in this load_tests.shapes shape")
    parser.add_argument("--formats", nargs="+", default=[*ONLINE_FORMATS, *CHECKPOINT_FORMATS],
                        choices=[*ONLINE_FORMATS, *CHECKPOINT_FORMATS])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group and fp8 block size")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="append the reference's greedy continuation of N tokens to each prompt")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape:
        from transformers import AutoModelForCausalLM

        from load_tests.shapes import shape_config

        model_dir = Path(tempfile.mkdtemp(prefix=f"{args.shape}-random-"))
        torch.manual_seed(0)
        with torch.device(device):
            AutoModelForCausalLM.from_config(shape_config(args.shape), dtype=torch.bfloat16).save_pretrained(model_dir)
    else:
        from workers.model_source import resolve_model

        model_dir = resolve_model(args.model)
    results = evaluate(model_dir, args.formats, dtype, device, args.num_prompts, args.max_len, args.group_size,
                       generate=args.generate)
    print(f"\n{args.shape or model_dir} on {device} ({str(dtype).removeprefix('torch.')} reference)")
    print(f"{'format':<18} {'positions':<10} {'mean KL (nats)':>15} {'top-1 agreement':>16} {'count':>7}")
    for fmt, acc in results.items():
        for name, part in (("all", acc), ("generated", acc.generated)):
            if part is not None:
                print(f"{fmt:<18} {name:<10} {part.mean_kl:>15.5f} {part.top1_agreement:>15.2%}"
                      f" {part.num_positions:>7}")


if __name__ == "__main__":
    main()
