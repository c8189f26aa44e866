"""GGUF files: config from metadata, tensors dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K so that its interleaved RoPE sees
pairs (2i, 2i+1); our RoPE is Hugging Face's rotate-half, so the permutation is undone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanoflow_jax.config import ConfigError, ModelConfig
from nanoflow_jax.models.params import Params
from nanoflow_jax.weights import names
from nanoflow_jax.weights.errors import WeightLoadError
from nanoflow_jax.weights.gguf_file import GGUFFile

if TYPE_CHECKING:
    from nanoflow_jax.tokenizer import Tokenizer

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Tensors a converter may add that the forward does not read: Llama 3.1's RoPE frequency factors.
IGNORED_TENSORS = frozenset({"rope_freqs.weight"})


def open_gguf(path: str | Path) -> GGUFFile:
    """An open `GGUFFile`, or a WeightLoadError that says what is wrong with the file."""
    return GGUFFile(path)


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    try:  # from_gguf_metadata falls back to the token count when the vocab size is absent
        return ModelConfig.from_gguf_metadata(f.metadata, has_output_tensor="output.weight" in f.tensors)
    except ConfigError as e:
        raise WeightLoadError(f"{f.path}: {e}") from e


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> None:
    """The file holds exactly the tensors `cfg` needs, in the shapes it needs, before anything is
    allocated. An unused tensor fails too, as in llama.cpp's tensor count check: a damaged name
    would otherwise drop it silently (a lost output.weight turns into a tied head)."""
    if cfg.num_layers > len(f.tensors):  # bounds the name list below by the file
        raise WeightLoadError(f"{f.path}: block_count {cfg.num_layers} exceeds the file's {len(f.tensors)} tensors")
    expected = names.file_shapes(cfg, names.GGUF_LAYER, names.GGUF_TOP)
    for name, shape in expected.items():
        info = f.tensors.get(name)
        if info is None:
            raise WeightLoadError(f"{f.path}: GGUF lacks tensor {name!r}: the file is incomplete or not a "
                                  f"{cfg.architecture} model")
        if info.shape != shape:
            raise WeightLoadError(f"{f.path}: {names.shape_error(name, info.shape, shape)}")
    unused = sorted(set(f.tensors) - set(expected) - IGNORED_TENSORS)
    if unused:
        shown = ", ".join(repr(n) for n in unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise WeightLoadError(f"{f.path} has {len(unused)} tensor(s) a {cfg.num_layers}-layer {cfg.architecture} "
                              f"model does not use ({shown}): the file is corrupt or not a plain {cfg.architecture} "
                              "model")


def tokenizer_from_gguf(f: GGUFFile, cfg: ModelConfig) -> Tokenizer:
    """The file's tokenizer, or a WeightLoadError when its vocabulary is broken or does not fit the model."""
    from nanoflow_jax.tokenizer import Tokenizer, TokenizerError

    try:
        tokenizer = Tokenizer.from_gguf(f)
    except TokenizerError as e:  # its message names the file
        raise WeightLoadError(str(e)) from e
    if tokenizer.vocab_size > cfg.vocab_size:  # ids past the embedding table would read other rows
        raise WeightLoadError(f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {cfg.vocab_size}: the file is corrupt or mismatched")
    return tokenizer


def read_gguf_model(path: str | Path, with_params: bool = True,
                    progress: bool = True) -> tuple[ModelConfig, Tokenizer, Params | None]:
    """Config, tokenizer and (unless `with_params` is False) host parameters of a GGUF file;
    every problem with the file is one WeightLoadError."""
    f = open_gguf(path)
    cfg = config_from_gguf(f)
    check_tensors(f, cfg)
    tokenizer = tokenizer_from_gguf(f, cfg)
    return cfg, tokenizer, load_gguf_params(f, cfg, progress) if with_params else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation ([out, in] layout)."""
    rows = w.shape[0]
    if w.ndim == 1:  # biases permute the same way
        return w.reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.reshape(n_heads, rows // n_heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_params(f: GGUFFile, cfg: ModelConfig, progress: bool = True) -> Params:
    """Dequantize every tensor to float32 numpy arrays in the pytree layout."""
    from tqdm.auto import tqdm

    check_tensors(f, cfg)

    def get(name: str) -> np.ndarray:
        info = f.tensors[name]
        if info.qtype_name not in SUPPORTED_QTYPES:
            raise WeightLoadError(f"tensor {name!r} uses quantization {info.qtype_name}; "
                                  f"supported: {', '.join(SUPPORTED_QTYPES)}")
        return f.dequantize(name)

    def fix(key: str, arr: np.ndarray) -> np.ndarray:
        if cfg.architecture in ("llama", "mistral"):
            if key in ("wq", "bq"):
                return _unpermute(arr, cfg.num_heads)
            if key in ("wk", "bk"):
                return _unpermute(arr, cfg.num_kv_heads)
        return arr

    # A bar redrawn with carriage returns into a log file garbles the lines after it: only
    # on a terminal.
    with tqdm(total=names.num_tensors(cfg), desc="dequantize", unit="tensor",
              disable=not (progress and sys.stderr.isatty()), leave=False) as bar:
        try:
            return names.assemble(cfg, get, names.GGUF_LAYER, names.GGUF_TOP, fix=fix, progress=bar.update)
        except WeightLoadError as e:
            raise WeightLoadError(f"{f.path}: {e}") from e
