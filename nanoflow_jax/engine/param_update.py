"""Swapping an engine's weights in place (`LLM.update_params`): check, move, re-layout.

The new parameters must match the engine's input layout leaf for leaf (names, shapes,
dtypes); a mismatch names the leaf. Leaves on another device or sharding (a training
mesh) are moved to the engine's sharding with `jax.device_put`, device to device. The
engine's layout (e.g. `fuse_qkv`) is then applied by one jitted call that donates the old
engine parameters, so the new ones are written into their buffers and peak memory stays
at one engine copy (plus the caller's own). Shapes never change, so nothing recompiles.
The engine owns its weights: `LLM(params=...)` copies the caller's (`own_copy`), and an
`LLMEngine` takes ownership of the arrays it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def as_plain_dicts(tree: Any) -> Any:
    """Nested mappings (Flax's FrozenDict included) as plain dicts; leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: as_plain_dicts(v) for k, v in tree.items()}
    return tree


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def param_spec(params: Params) -> Params:
    """The (shape, dtype) of every leaf: what an update must match."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), params)


def check_like(spec: Params, params: Any) -> None:
    """Raise a ValueError naming the first leaf of `params` that differs from `spec`."""
    def walk(exp: Any, got: Any, path: str) -> None:
        where = path or "<root>"
        if isinstance(exp, dict):
            if not isinstance(got, Mapping):
                raise ValueError(f"update_params: parameter group {where} must be a dict, got {type(got).__name__}")
            missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
            if missing or extra:
                what = f"missing {path + '/' if path else ''}{missing[0]}" if missing else \
                    f"unexpected {path + '/' if path else ''}{extra[0]}"
                raise ValueError(f"update_params: {what}; the new parameters must have the engine's tree")
            for k in exp:
                walk(exp[k], got[k], f"{path}/{k}" if path else k)
            return
        shape, dtype = tuple(getattr(got, "shape", np.shape(got))), _dtype(got)
        if shape != exp.shape or dtype != exp.dtype:
            raise ValueError(f"update_params: parameter {where} is {dtype.name}{list(shape)} but the engine's is "
                             f"{np.dtype(exp.dtype).name}{list(exp.shape)}: cast or reshape it before the update")

    walk(spec, params, "")


def move_to(params: Params, like: Callable[[str], Any]) -> Params:
    """Each leaf on the sharding `like(path)` of the engine's matching leaf (no-op where it
    already is; device to device otherwise; host arrays are uploaded)."""
    def put(path: tuple, x: Any) -> Any:
        target = like(jax.tree_util.keystr(path))
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(x, target)

    return jax.tree_util.tree_map_with_path(put, params)


@jax.jit
def own_copy(params: Params) -> Params:
    """A copy on the same devices: the engine's weights must not alias the caller's, because
    `update_params` donates the engine's old weights."""
    return jax.tree_util.tree_map(jnp.copy, params)


def relayout_fn(layout: Callable[[Params], Params]) -> Callable[[Params, Params], Params]:
    """jit of (old engine params, new params) -> a copy of layout(new), the old ones donated.

    The copy keeps the engine's arrays its own: a trainer that donates or deletes its
    params after the update cannot pull them from under the engine. `keep_unused`: the
    old params are not read, and jit would otherwise drop them, donation and all."""
    return jax.jit(lambda old, new: jax.tree_util.tree_map(jnp.copy, layout(new)), donate_argnums=(0,),
                   keep_unused=True)
