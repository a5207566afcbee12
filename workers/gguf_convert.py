"""Convert a llama.cpp GGUF file into a Hugging Face style directory Octavo (and transformers)
can load: float32 `model.safetensors`, config.json, tokenizer files with the chat template,
and generation_config.json.

Weights are dequantized with the `gguf` package and renamed from llama.cpp's names. For the
`llama` architecture llama.cpp's converter permutes the rows of q and k (to turn Hugging Face's
"rotate halves" rotary layout into its interleaved one); that permutation is undone here.
Config and tokenizer come from transformers' own GGUF support.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from workers.model_errors import ModelLoadError
from workers.progress import progress

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# transformers picks the model_type (e.g. "mistral" for a llama-architecture Mistral file).
ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import gguf

    gguf_path = Path(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e
    arch = reader.fields["general.architecture"].contents()
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} of {gguf_path} is not supported; "
                             f"supported: {SUPPORTED_GGUF_ARCHITECTURES}")
    tensors = _convert_tensors(reader, arch, gguf_path)
    _save_safetensors(tensors, out_dir / "model.safetensors")
    _save_config_and_tokenizer(reader, arch, gguf_path, out_dir)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it has none."""
    if m := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}" if part in LAYER_NAMES else None
    if m := _GLOBAL_TENSOR.fullmatch(gguf_name):
        part, kind = m.groups()
        return f"{GLOBAL_NAMES[part]}.{kind}" if part in GLOBAL_NAMES else None
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)`
    (convert_hf_to_gguf.py, LlamaModel.permute), for q with n_head heads and k with n_kv_heads."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _convert_tensors(reader, arch: str, gguf_path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    n_head = reader.fields[f"{arch}.attention.head_count"].contents()
    n_kv_head = reader.fields[f"{arch}.attention.head_count_kv"].contents()
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # Llama 3.1 style rope scaling is stored as per-frequency factors whose parameters the
        # file does not keep; converting without them would silently change every position.
        raise ModelLoadError(f"{gguf_path} uses rope_freqs (Llama 3.1 rope scaling), which GGUF "
                             "conversion does not support; use the Hugging Face checkpoint")
    tensors: dict[str, np.ndarray] = {}
    with progress(len(reader.tensors), f"converting {gguf_path.name}", "tensor") as bar:
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                raise ModelLoadError(f"GGUF tensor {tensor.name!r} in {gguf_path} has no Hugging Face "
                                     f"equivalent for architecture {arch!r}")
            w = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            if arch == "llama" and ".self_attn.q_proj." in name:
                w = unpermute_qk(w, n_head)
            elif arch == "llama" and ".self_attn.k_proj." in name:
                w = unpermute_qk(w, n_kv_head)
            tensors[name] = np.ascontiguousarray(w)
            bar.update()
    return tensors


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # transformers refuses safetensors files whose metadata lacks a framework format.
    save_file(tensors, path, metadata={"format": "pt"})


def _save_config_and_tokenizer(reader, arch: str, gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if config.model_type not in ARCHITECTURE_OF_MODEL_TYPE:
        raise ModelLoadError(f"GGUF {gguf_path} gives model_type {config.model_type!r}; "
                             f"supported: {sorted(ARCHITECTURE_OF_MODEL_TYPE)}")
    config.architectures = [ARCHITECTURE_OF_MODEL_TYPE[config.model_type]]
    # transformers maps head_dim only for llama/mistral (from rope.dimension_count); Qwen3's
    # head_dim differs from hidden_size / num_heads and is the key length.
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = key_length.contents()
    config.dtype = "float32"  # what model.safetensors holds
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    if config.eos_token_id is not None:
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(out_dir)
