"""GGUF files: config from metadata, tensors dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K so that its interleaved RoPE sees
pairs (2i, 2i+1); our RoPE is Hugging Face's rotate-half, so the permutation is undone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nanoflow_jax.config import ConfigError, ModelConfig
from nanoflow_jax.models.params import Params
from nanoflow_jax.weights import names
from nanoflow_jax.weights.errors import WeightLoadError

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Metadata arrays that can be huge and that the config does not need.
_SKIP_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores")


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader`, or a WeightLoadError that says what is wrong with the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted struct/value/index errors
        raise WeightLoadError(
            f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); download it again") from e


def read_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in _SKIP_FIELDS:
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # unknown field types do not matter for the config
            continue
    if "tokenizer.ggml.tokens" in reader.fields:
        meta["tokenizer.ggml.num_tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return meta


def config_from_gguf(reader: Any) -> ModelConfig:
    meta = read_metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    if "llama.vocab_size" not in meta and "tokenizer.ggml.num_tokens" in meta:
        arch = meta.get("general.architecture")
        meta[f"{arch}.vocab_size"] = meta["tokenizer.ggml.num_tokens"]
    try:
        return ModelConfig.from_gguf_metadata(meta, has_output_tensor="output.weight" in tensor_names)
    except ConfigError as e:
        raise WeightLoadError(f"{Path(reader.data.filename).name if hasattr(reader.data, 'filename') else 'GGUF'}: {e}") from e


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation ([out, in] layout)."""
    rows = w.shape[0]
    if w.ndim == 1:  # biases permute the same way
        return w.reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.reshape(n_heads, rows // n_heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_params(reader: Any, cfg: ModelConfig, progress: bool = True) -> Params:
    """Dequantize every tensor to float32 numpy arrays in the pytree layout."""
    import gguf
    from tqdm.auto import tqdm

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise WeightLoadError(f"GGUF lacks tensor {name!r}: the file is incomplete or not a {cfg.architecture} model")
        qname = t.tensor_type.name
        if qname not in SUPPORTED_QTYPES:
            raise WeightLoadError(f"tensor {name!r} uses quantization {qname}; supported: {', '.join(SUPPORTED_QTYPES)}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise WeightLoadError(f"could not dequantize {name!r} ({qname}): {e}; the file may be corrupt") from e
        expected = tuple(int(d) for d in reversed(t.shape))
        if arr.size != int(np.prod(expected)):
            raise WeightLoadError(f"tensor {name!r} holds {arr.size} values, its header says {expected}: corrupt file")
        return np.asarray(arr, dtype=np.float32).reshape(expected)

    def fix(key: str, arr: np.ndarray) -> np.ndarray:
        if cfg.architecture == "llama" or cfg.architecture == "mistral":
            if key in ("wq", "bq"):
                return _unpermute(arr, cfg.num_heads)
            if key in ("wk", "bk"):
                return _unpermute(arr, cfg.num_kv_heads)
        return arr

    with tqdm(total=names.num_tensors(cfg), desc="dequantize", unit="tensor",
              disable=not progress, leave=False) as bar:
        return names.assemble(cfg, get, names.GGUF_LAYER, names.GGUF_TOP, fix=fix, progress=bar.update)
