"""Write quantized checkpoints from a 16/32-bit one, in each format's own conventions, for the
quantization tests and benchmarks (no quantization library installs here without a GPU stack;
these follow the formats' documented layouts, independently of Octavo's loaders):

- `awq`: AutoAWQ's GEMM layout, asymmetric round-to-nearest per group of input rows;
- `gptq`: GPTQ v1, symmetric (zero point 8, stored as 7) or asymmetric, round-to-nearest;
- `fp8-channel`: compressed-tensors float-quantized, per-channel weights, dynamic per-token
  activations (llm-compressor's FP8_DYNAMIC);
- `fp8-tensor-static`: compressed-tensors float-quantized, per-tensor weights and static
  per-tensor input scales (llm-compressor's FP8), plus k_scale / v_scale for an FP8 KV cache;
- `fp8-block`: `quant_method: fp8` with block-wise `weight_scale_inv` (DeepSeek / Qwen3-FP8).

    python -m load_tests.quant_checkpoints SRC_DIR OUT_DIR --format awq
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMATS = ("awq", "gptq", "gptq-asym", "fp8-channel", "fp8-tensor-static", "fp8-block")
LINEAR_SUFFIXES = tuple(f"{name}.weight" for name in
                        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 the checkpoints store."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] in [0, 16) -> [rows, cols / 8]: word c's bits 4i..4i+3 = column 8c + AWQ_ORDER[i]."""
    q = q.long()
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for col in range(words.shape[1]):
        for i, j in enumerate(AWQ_ORDER):
            words[:, col] |= q[:, col * 8 + j] << (4 * i)
    return to_int32(words)


def pack_gptq_rows(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows / 8, cols]: word r's bits 4j..4j+3 = row 8r + j."""
    q = q.long()
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for j in range(8):
            words[r] |= q[8 * r + j] << (4 * j)
    return to_int32(words)


def pack_gptq_cols(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows, cols / 8]: word c's bits 4i..4i+3 = column 8c + i (4 bits each:
    v1's zero - 1 can only stand for zero points 1 to 16, so quantize_int4 keeps them >= 1)."""
    q = q.long() & 0xF
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i in range(8):
            words[:, c] |= q[:, 8 * c + i] << (4 * i)
    return to_int32(words)


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool, min_zero: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [in, out], zeros [in / g, out], scales [in / g, out]) with
    W^T[k, n] ~ (q - zero) * scale by round-to-nearest over groups of g input rows."""
    w = weight.float().T.reshape(-1, group_size, weight.shape[0])  # [groups, g, out]
    if symmetric:
        scales = (w.abs().amax(1) / 7.5).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = (-lo / scales).round().clamp(min_zero, 15)
    q = (w / scales[:, None] + zeros[:, None]).round().clamp(0, 15)
    return q.reshape(-1, weight.shape[0]).int(), zeros.int(), scales.half()


def dequantize_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [out, in] weight the quantized one stands for."""
    g = lambda t: t.float().repeat_interleave(group_size, 0)  # noqa: E731
    return ((q.float() - g(zeros)) * g(scales)).T


def quantize_linear(name: str, weight: torch.Tensor, fmt: str, group_size: int,
                    input_amax: dict[str, float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint tensors of one linear layer's `name.weight`, and the weight they stand for."""
    prefix = name.removesuffix(".weight")
    if fmt in ("awq", "gptq", "gptq-asym"):
        q, zeros, scales = quantize_int4(weight, group_size, symmetric=fmt == "gptq",
                                         min_zero=0 if fmt == "awq" else 1)
        if fmt == "awq":
            tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales}
        else:
            tensors = {"qweight": pack_gptq_rows(q), "qzeros": pack_gptq_cols(zeros - 1), "scales": scales,
                       "g_idx": torch.arange(weight.shape[1], dtype=torch.int32) // group_size}
        dequantized = dequantize_int4(q, zeros, scales, group_size)
    elif fmt == "fp8-channel":
        scale = weight.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        tensors, dequantized = {"weight": q, "weight_scale": scale}, q.float() * scale
    elif fmt == "fp8-tensor-static":
        scale = weight.float().abs().amax().clamp(min=1e-12).reshape(1) / FP8_MAX
        q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        tensors = {"weight": q, "weight_scale": scale,
                   "input_scale": torch.tensor([input_amax[prefix] / FP8_MAX])}
        dequantized = q.float() * scale
    else:  # fp8-block
        rows, cols = group_size, group_size
        out, inp = weight.shape
        blocks = weight.float().reshape(out // rows, rows, inp // cols, cols)
        scale = blocks.abs().amax((1, 3)).clamp(min=1e-12) / FP8_MAX  # [out / rows, in / cols]
        q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        dequantized = (q.float() * scale[:, None, :, None]).reshape(out, inp)
        tensors = {"weight": q.reshape(out, inp), "weight_scale_inv": scale}
    return {f"{prefix}.{key}": value.contiguous() for key, value in tensors.items()}, dequantized


def quantization_config(fmt: str, group_size: int) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    if fmt in ("gptq", "gptq-asym"):
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                "sym": fmt == "gptq", "checkpoint_format": "gptq"}
    if fmt == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [group_size, group_size]}
    static = fmt == "fp8-tensor-static"
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                   "strategy": "tensor" if static else "token"}
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": activations,
                                            "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                        "dynamic": False,
                                                        "strategy": "tensor" if static else "channel"}}}}
    if static:
        config["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    return config


@torch.no_grad()
def calibrate(src: Path, num_tokens: int = 64) -> tuple[dict[str, float], dict[str, float]]:
    """(input amax per linear layer, k/v amax per attention block) over random token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    inputs: dict[str, float] = {}
    outputs: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(s.removesuffix(".weight")
                                                                       for s in LINEAR_SUFFIXES)):
            def hook(mod, args, out, name=name):
                inputs[name] = max(inputs.get(name, 0.0), float(args[0].abs().max()))
                outputs[name] = max(outputs.get(name, 0.0), float(out.abs().max()))
            hooks.append(module.register_forward_hook(hook))
    ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    model(ids)
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def write_quantized(src: Path, out: Path, fmt: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Write `fmt`'s checkpoint of `src` to `out` (config, tokenizer files copied); returns the
    dequantized weights (checkpoint name -> [out, in]) the quantized ones stand for."""
    assert fmt in FORMATS, fmt
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, out / path.name)
    input_amax, output_amax = calibrate(src) if fmt == "fp8-tensor-static" else ({}, {})
    tensors: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith(LINEAR_SUFFIXES):
                    quantized, dequantized[name] = quantize_linear(name, tensor, fmt, group_size, input_amax)
                    tensors.update(quantized)
                else:
                    tensors[name] = tensor
    for name, amax in output_amax.items():  # an FP8 KV cache's scales, under vLLM's names
        for proj, key in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            if name.endswith(f"self_attn.{proj}"):
                tensors[f"{name.removesuffix(proj)}{key}"] = torch.tensor(amax / FP8_MAX)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, group_size)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group / fp8 block size")
    args = parser.parse_args()
    write_quantized(Path(args.src), Path(args.out), args.format, args.group_size)
    print(f"wrote {args.out} ({args.format})")


if __name__ == "__main__":
    main()
