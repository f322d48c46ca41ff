"""Write a tiny HF Qwen2/Qwen3 checkpoint as a GGUF file, the way llama.cpp's converter lays it out.

Why: the real 0.5B GGUF covers only the Qwen2 architecture and its own tensor types; this lets the tests put a
Qwen3 GGUF (q/k norms) and chosen tensor types (Q4_0, Q8_0, ...) through the same conversion and repack.
Only the metadata transformers' GGUF loader reads is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _tokenizer_fields(writer, folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(config["chat_template"])


def write_gguf(folder: Path, path: Path, types: dict[str, str] | None = None) -> Path:
    """GGUF of the HF checkpoint in ``folder``; ``types`` maps a GGUF name fragment ("ffn_up") to a tensor type.

    Unlisted tensors are F32. 1-D tensors (norms, biases) stay F32 as in llama.cpp's files.
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    arch_name = config["model_type"]
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch_name]
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _tokenizer_fields(writer, folder)
    for hf_name, value in sorted(load_file(str(folder / "model.safetensors")).items()):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        value = value.astype(np.float32)
        qtype = next((t for frag, t in (types or {}).items() if frag in name), "F32") if value.ndim == 2 else "F32"
        if qtype == "F32":
            writer.add_tensor(name, value)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
