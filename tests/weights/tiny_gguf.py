"""Write a tiny random Llama as a GGUF file the way llama.cpp's converter lays it out."""

import gguf
import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.weights import names


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (the converter's permutation)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, params, cfg: ModelConfig, qtype: str = "F32", arch: str = "llama",
                    drop: str | None = None, override_ffn: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(override_ffn or cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tensors = names.export(params, cfg, names.GGUF_LAYER, names.GGUF_TOP)
    q = gguf.GGMLQuantizationType[qtype]
    for name, arr in tensors.items():
        if name == drop:
            continue
        arr = np.asarray(arr, np.float32)
        if ".attn_q." in name:
            arr = permute_like_llama_cpp(arr, cfg.num_heads)
        elif ".attn_k." in name:
            arr = permute_like_llama_cpp(arr, cfg.num_kv_heads)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, arr)  # norms stay F32, as llama.cpp keeps them
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
