"""The parameter pytree (layout: docs/architecture.md) and random initialisation."""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import ModelConfig

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "f16": jnp.float16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """'float32' / 'bfloat16' / a dtype -> a jnp dtype, with a clear error."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter, as nested dicts of tuples."""
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layers = {
        "attn_norm": (L, E),
        "wq": (L, E, cfg.q_size), "wk": (L, E, cfg.kv_size), "wv": (L, E, cfg.kv_size),
        "wo": (L, cfg.q_size, E),
        "mlp_norm": (L, E),
        "w_gate": (L, E, F), "w_up": (L, E, F), "w_down": (L, F, E),
    }
    if cfg.attention_bias:
        layers.update(bq=(L, cfg.q_size), bk=(L, cfg.kv_size), bv=(L, cfg.kv_size))
    shapes: Params = {"embed": (V, E), "layers": layers, "final_norm": (E,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (E, V)
    return shapes


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise a ValueError naming the first missing, extra or mis-shaped tensor."""
    expected = param_shapes(cfg)

    def walk(exp: Any, got: Any, path: str) -> None:
        if _is_shape(exp):
            shape = tuple(getattr(got, "shape", ()))
            if shape != exp:
                raise ValueError(f"parameter {path} has shape {shape}, expected {exp} for this config")
            return
        if not isinstance(got, dict):
            raise ValueError(f"parameter group {path or '<root>'} must be a dict, got {type(got).__name__}")
        missing = sorted(set(exp) - set(got))
        extra = sorted(set(got) - set(exp))
        if missing:
            raise ValueError(f"missing parameter {path + '/' if path else ''}{missing[0]}")
        if extra:
            raise ValueError(f"unexpected parameter {path + '/' if path else ''}{extra[0]} for this config")
        for k in exp:
            walk(exp[k], got[k], f"{path}/{k}" if path else k)

    walk(expected, params, "")


def init_tree(shapes: Any, key: jax.Array, dtype: str | jnp.dtype = "float32", prefix: str = "",
              shardings: Any = None) -> Any:
    """Random arrays for a (sub)tree of `param_shapes`, created on the default device, or
    each leaf born split as `shardings` (a tree like `shapes`) says: the same values.

    Normal(0, 1/sqrt(fan_in)) matrices keep activations O(1) through deep stacks; norm
    weights are ones; biases small. `prefix` names the subtree (e.g. "layers") so the
    same rules apply when the Flax module initialises one group at a time.
    """
    dt = resolve_dtype(dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    places = [None] * len(flat) if shardings is None else treedef.flatten_up_to(shardings)
    out = []
    for i, ((path, shape), place) in enumerate(zip(flat, places)):
        name = prefix + jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape, dt, device=place))
            continue
        is_bias = any(name.endswith(f"['{b}']") for b in ("bq", "bk", "bv"))
        fan_in = shape[-2] if len(shape) >= 2 and not is_bias and "embed" not in name else 1
        std = 0.02 if is_bias else float(1.0 / np.sqrt(fan_in))
        key_i = jax.random.fold_in(key, i)
        out.append(_normal(key_i, shape, std, dt) if place is None else _normal_on(place)(key_i, shape, std, dt))
    return jax.tree_util.tree_unflatten(treedef, out)


@partial(jax.jit, static_argnames=("shape", "std", "dtype"))
def _normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> jax.Array:
    # One compiled program per distinct shape; each leaf is born on the device.
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _normal_on(sharding: Any) -> Any:
    # Born split over the devices (a model too big for one); the counter-based PRNG gives
    # the same numbers under any sharding.
    return jax.jit(_normal.__wrapped__, static_argnames=("shape", "std", "dtype"), out_shardings=sharding)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: str | jnp.dtype = "float32",
                shardings: Any = None) -> Params:
    """Random parameters for `cfg`, created directly on the device (no host copy); with
    `shardings` (a tree like `param_shapes(cfg)`), each leaf split over its devices."""
    return init_tree(param_shapes(cfg), key, dtype, shardings=shardings)


def cast_params(params: Params, dtype: str | jnp.dtype) -> Params:
    dt = resolve_dtype(dtype)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


def fuse_qkv(params: Params) -> Params:
    """The same parameters with each layer's Q, K and V projections as one [E, q + 2 kv]
    matrix `wqkv` (and bias `bqkv`): one GEMM instead of three, which matters at decode
    sizes where the K and V GEMMs alone fill few SMs. The input pytree is left as it is."""
    layers = dict(params["layers"])
    if "wqkv" in layers:
        return params
    parts = [layers.pop(name) for name in ("wq", "wk", "wv")]
    layers["wqkv"] = jnp.concatenate(parts, axis=-1)
    if "bq" in layers:
        layers["bqkv"] = jnp.concatenate([layers.pop(name) for name in ("bq", "bk", "bv")], axis=-1)
    return {**params, "layers": layers}
