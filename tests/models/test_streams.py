"""Stream regions: the inliner that makes a region flat keeps every value and leaves no nested jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.models.streams import inline_jits, on_stream, step_compiler_options, stream_group


def _nested(x: jax.Array, w: jax.Array) -> dict:
    inner = jax.jit(lambda a: jnp.where(a > 0, a, -a) @ w)   # a user jit, around jnp's own jits
    return {"y": inner(jnp.pad(x, ((0, 1), (0, 0)))[:-1]), "s": (jnp.sum(x), x * 2)}


def _primitive_names(fn, *args) -> set[str]:
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_inline_jits_keeps_values_and_flattens():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    assert _primitive_names(_nested, x, w) & {"jit", "pjit"}
    flat = inline_jits(_nested)
    assert not _primitive_names(flat, x, w) & {"jit", "pjit"}
    got, want = flat(x, w), _nested(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_inline_jits_reads_closed_over_tracers_inside_a_scan():
    x = jnp.arange(-3.0, 3.0)

    @jax.jit
    def run(x):
        def body(c, _):
            return c + 1, inline_jits(lambda a: jnp.where(a > c, a, c))(x)
        return jax.lax.scan(body, 0.0, None, length=3)[1]

    want = np.stack([np.where(np.asarray(x) > c, np.asarray(x), c) for c in range(3)])
    np.testing.assert_array_equal(np.asarray(run(x)), want)


def test_streams_are_ignored_off_gpu():
    if jax.default_backend() == "gpu":
        return
    fn = lambda a: a + 1
    assert on_stream(fn, 1) is fn and on_stream(fn, 0) is fn
    assert step_compiler_options("nanoflow") is None and step_compiler_options("sequential") is None
    with stream_group():
        assert float(fn(jnp.float32(1))) == 2.0
