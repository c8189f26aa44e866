"""Helpers for the kernel tests: random inputs, error bounds, block tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rand(rng: np.random.Generator, *shape: int, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def assert_close(out: jax.Array, ref: jax.Array, *, dtype=None) -> None:
    """Relative Frobenius error: < 1e-5 for f32 inputs, < 1e-2 for bf16; NaN fails."""
    o, r = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    assert o.shape == r.shape, (o.shape, r.shape)
    assert np.isfinite(o).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    bound = 1e-2 if (dtype or out.dtype) == jnp.bfloat16 else 1e-5
    err = np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)
    assert err < bound, f"relative error {err:.3g} >= {bound}"


def shuffled_pages(rng: np.random.Generator, rows: int, width: int, num_pages: int) -> jax.Array:
    """A block table of distinct, shuffled non-null pages."""
    ids = rng.permutation(np.arange(1, num_pages))[: rows * width]
    return jnp.asarray(ids.reshape(rows, width), jnp.int32)
