"""A servable checkpoint with random weights in a real model's shape, for serving benchmarks
where real weights cannot be had (the GPU machine has no network).

    python -m load_tests.make_random_model /tmp/qwen3-0.6b-random          # Qwen3-0.6B shape, bf16
    python -m load_tests.make_random_model /tmp/tiny-random --tiny         # a few MB, for CPU tests
    python -m load_tests.make_random_model /tmp/a3b-4l --shape qwen3-30b-a3b --num-layers 4   # any shape of
                                                                           # load_tests/shapes.py, fewer layers
    python -m load_tests.make_random_model /tmp/llama-70b --shape llama-3.1-70b --config-only   # no weights:
                                                                           # for `octavo serve --load-format dummy`

The server needs a tokenizer whose vocabulary covers every id a random model may generate
(151,936 for Qwen3): a borrowed smaller one could not decode the high ids. So this writes its
own byte-level tokenizer of exactly the model's vocabulary: the 256 byte symbols (any text
encodes, one token per byte), three special tokens, and filler words " w<hex>" for every other
id, so each generated token decodes to visible text.
"""

from __future__ import annotations

import argparse

import torch

from load_tests.shapes import SHAPES, shape_config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS_START = 256  # after the byte symbols: <|endoftext|>'s id, the eos
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen3_config(tiny: bool):
    from transformers import Qwen3Config

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128) if tiny else \
        dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             intermediate_size=3072)
    return Qwen3Config(**shape, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1_000_000, bos_token_id=None, pad_token_id=None,
                       eos_token_id=SPECIAL_TOKENS_START, dtype="bfloat16")


def byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [f"\u0120w{i:x}" for i in range(vocab_size - len(symbols) - len(SPECIAL_TOKENS))]  # \u0120: a space
    vocab = {token: i for i, token in enumerate(symbols + SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: they keep their ids
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=SPECIAL_TOKENS[0])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 64 (same vocabulary)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a shape of load_tests/shapes.py instead of "
                        "Qwen3-0.6B's (its eos id becomes the tokenizer's)")
    parser.add_argument("--num-layers", type=int, help="keep only this many layers of the shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-only", action="store_true",
                        help="config.json and the tokenizer, no weights: a server started with --load-format dummy "
                             "makes random ones on the device (a shape too large to write, such as a 70B)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    if args.shape:
        config = shape_config(args.shape)
        config.bos_token_id = config.pad_token_id = None
        config.eos_token_id = SPECIAL_TOKENS_START
    else:
        config = qwen3_config(args.tiny)
    if args.num_layers:
        config.num_hidden_layers = args.num_layers
    tokenizer = byte_level_tokenizer(config.vocab_size)
    assert tokenizer.eos_token_id == config.eos_token_id and len(tokenizer) == config.vocab_size
    tokenizer.save_pretrained(args.out_dir)
    if args.config_only:
        config.save_pretrained(args.out_dir)
        print(f"wrote {args.out_dir}: config.json and a tokenizer of {len(tokenizer)} tokens, no weights")
        return
    torch.manual_seed(args.seed)
    # Random initialization of 0.6B parameters is much faster on a GPU, where there is one.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    main()
