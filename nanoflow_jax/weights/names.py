"""Tensor-name maps between checkpoints and the parameter pytree.

Each entry: pytree key -> (name template in the file, transpose?). Files store
matrices [out, in] (PyTorch/GGUF convention); the pytree stores [in, out].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.params import Params, param_shapes
from nanoflow_jax.weights.errors import WeightLoadError

HF_LAYER = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}

GGUF_LAYER = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight",
    "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias", "bv": "blk.{i}.attn_v.bias",
    "wo": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
}
GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}

# Matrices whose file layout is [out, in]; embeddings are [V, E] in both.
TRANSPOSED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"}


def assemble(cfg: ModelConfig, get: Callable[[str], np.ndarray], layer_names: dict[str, str],
             top_names: dict[str, str], fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
             progress: Callable[[int], None] | None = None) -> Params:
    """Build the host pytree (numpy) by fetching each tensor with `get(name)`.

    `fix(key, array)` post-processes a tensor in file layout (e.g. undo a permutation).
    Shapes are checked against the config so a mismatch names the tensor.
    """
    shapes = param_shapes(cfg)

    def load(key: str, name: str, expected: tuple[int, ...]) -> np.ndarray:
        arr = get(name)
        # Checked in file layout, before `fix`: a fix such as a head permutation reshapes by the config.
        if tuple(arr.shape) != _file_shape(key, expected):
            raise shape_error(name, tuple(arr.shape), _file_shape(key, expected))
        if fix is not None:
            arr = fix(key, arr)
        if key in TRANSPOSED:
            arr = arr.T
        if progress is not None:
            progress(1)
        return arr

    params: Params = {}
    for key, shape in shapes.items():
        if key != "layers":
            params[key] = load(key, top_names[key], shape)
    params["layers"] = {
        key: np.stack([load(key, layer_names[key].format(i=i), shape[1:]) for i in range(cfg.num_layers)])
        for key, shape in shapes["layers"].items()
    }
    return params


def _file_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if key in TRANSPOSED else tuple(shape)


def shape_error(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> WeightLoadError:
    return WeightLoadError(f"tensor {name!r} has shape {got}, expected {expected} from the model config "
                           "(the file stores matrices [out, in]): the weights and config disagree")


def file_shapes(cfg: ModelConfig, layer_names: dict[str, str], top_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor `assemble` reads for `cfg`, with its shape in the file's layout."""
    shapes = param_shapes(cfg)
    out = {top_names[key]: _file_shape(key, shape) for key, shape in shapes.items() if key != "layers"}
    for key, shape in shapes["layers"].items():
        out.update((layer_names[key].format(i=i), _file_shape(key, shape[1:])) for i in range(cfg.num_layers))
    return out


def num_tensors(cfg: ModelConfig) -> int:
    shapes = param_shapes(cfg)
    return len(shapes) - 1 + cfg.num_layers * len(shapes["layers"])


def export(params: Params, cfg: ModelConfig, layer_names: dict[str, str],
           top_names: dict[str, str]) -> dict[str, np.ndarray]:
    """The inverse of `assemble` (no `fix`): pytree -> {file name: array in file layout}."""
    out: dict[str, np.ndarray] = {}
    for key, value in params.items():
        if key == "layers":
            for lkey, stacked in value.items():
                for i in range(cfg.num_layers):
                    arr = np.asarray(stacked[i])
                    out[layer_names[lkey].format(i=i)] = arr.T if lkey in TRANSPOSED else arr
        else:
            arr = np.asarray(value)
            out[top_names[key]] = arr.T if key in TRANSPOSED else arr
    return out
