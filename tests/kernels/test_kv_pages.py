"""write_kv and page gather/scatter, interpreted, vs jnp (the whole cache is compared,
so pages a kernel must not touch are checked too)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gather_pages, reference as ref, scatter_pages, write_kv

from kernel_testing import rand

L, P, PS, K, D = 2, 10, 8, 3, 16


def _slots(rng, t):
    """Distinct slots off the null page, in shuffled pages (ragged, not page-aligned)."""
    return jnp.asarray(rng.permutation(np.arange(PS, P * PS))[:t], jnp.int32)


@pytest.mark.parametrize("programs", [1, 4, 1000])
@pytest.mark.parametrize("t", [1, 13])
def test_write_kv_one_layer(rng, programs, t):
    k, v = rand(rng, P, PS, K, D), rand(rng, P, PS, K, D)
    kn, vn, slots = rand(rng, t, K, D), rand(rng, t, K, D), _slots(rng, t)
    ko, vo = write_kv(k, v, kn, vn, slots, num_programs=programs, interpret=True)
    rk, rv = ref.write_kv(k, v, kn, vn, slots)
    np.testing.assert_array_equal(np.asarray(ko), np.asarray(rk))
    np.testing.assert_array_equal(np.asarray(vo), np.asarray(rv))


@pytest.mark.parametrize("layer", [0, 1])
def test_write_kv_whole_cache_at_layer(rng, layer):
    k, v = rand(rng, L, P, PS, K, D, dtype=jnp.bfloat16), rand(rng, L, P, PS, K, D, dtype=jnp.bfloat16)
    kn, vn, slots = rand(rng, 9, K, D), rand(rng, 9, K, D), _slots(rng, 9)
    ko, vo = write_kv(k, v, kn, vn, slots, layer=jnp.int32(layer), num_programs=3, interpret=True)
    rk, rv = ref.write_kv(k[layer], v[layer], kn, vn, slots)
    np.testing.assert_array_equal(np.asarray(ko[layer]), np.asarray(rk))
    np.testing.assert_array_equal(np.asarray(vo[layer]), np.asarray(rv))
    other = 1 - layer
    np.testing.assert_array_equal(np.asarray(ko[other]), np.asarray(k[other]))
    np.testing.assert_array_equal(np.asarray(vo[other]), np.asarray(v[other]))


@pytest.mark.parametrize("scaling", [None, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=64)])
@pytest.mark.parametrize("programs", [1, 5])
def test_write_kv_rotates_k_on_the_way_in(rng, programs, scaling):
    """rope_positions: K lands in the cache as apply_rope would leave it (f32 math, the
    whole cache compared), V untouched; the layer's other pages and layers unchanged."""
    k, v = rand(rng, L, P, PS, K, D), rand(rng, L, P, PS, K, D)
    t = 11
    kn, vn, slots = rand(rng, t, K, D), rand(rng, t, K, D), _slots(rng, t)
    pos = jnp.asarray(rng.integers(0, 500, t), jnp.int32)
    ko, vo = write_kv(k, v, kn, vn, slots, layer=jnp.int32(1), rope_positions=pos, rope_theta=5000.0,
                      rope_scaling=scaling, num_programs=programs, interpret=True)
    roped = ref.apply_rope(kn, pos, theta=5000.0, scaling=scaling)
    rk, rv = ref.write_kv(k[1], v[1], roped, vn, slots)
    np.testing.assert_allclose(np.asarray(ko[1]), np.asarray(rk), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(vo[1]), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(ko[0]), np.asarray(k[0]))


def test_write_kv_needs_layer_for_whole_cache(rng):
    k = rand(rng, L, P, PS, K, D)
    with pytest.raises(ValueError):
        write_kv(k, k, rand(rng, 2, K, D), rand(rng, 2, K, D), _slots(rng, 2), interpret=True)


@pytest.mark.parametrize("programs", [1, 3, 1000])
@pytest.mark.parametrize("n", [1, 5])
def test_gather_scatter_pages(rng, programs, n):
    pages = rand(rng, L, P, PS, K, D)
    ids = jnp.asarray(rng.permutation(np.arange(1, P))[:n], jnp.int32)
    got = gather_pages(pages, ids, num_programs=programs, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.gather_pages(pages, ids)))
    buf = rand(rng, L, n, PS, K, D)
    out = scatter_pages(pages, ids, buf, num_programs=programs, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.scatter_pages(pages, ids, buf)))


def test_offload_round_trip_restores_pages(rng):
    pages = rand(rng, L, P, PS, K, D, dtype=jnp.bfloat16)
    ids = jnp.asarray([7, 2, 5], jnp.int32)
    saved = gather_pages(pages, ids, num_programs=2, interpret=True)
    wiped = pages.at[:, ids].set(0)
    back = scatter_pages(wiped, ids, saved, num_programs=2, interpret=True)
    np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(pages, np.float32))


def test_write_kv_into_an_fp8_cache_saturates(rng):
    """An fp8 (e4m3) cache: values are rounded to e4m3, and ones past its range (+-448, where a
    plain cast gives NaN) saturate; with RoPE on the way in too."""
    fp8 = jnp.float8_e4m3fn
    k, v = rand(rng, L, P, PS, K, D, dtype=fp8), rand(rng, L, P, PS, K, D, dtype=fp8)
    t = 13
    kn, vn, slots = rand(rng, t, K, D, scale=300.0), rand(rng, t, K, D, scale=300.0), _slots(rng, t)
    assert float(jnp.max(jnp.abs(vn))) > 448   # some values need saturating
    ko, vo = write_kv(k, v, kn, vn, slots, layer=jnp.int32(0), num_programs=3, interpret=True)
    rk, rv = ref.write_kv(k[0], v[0], kn, vn, slots)
    assert ko.dtype == fp8 and np.isfinite(np.asarray(vo.astype(jnp.float32))).all()
    np.testing.assert_array_equal(np.asarray(ko[0].astype(jnp.float32)), np.asarray(rk.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(vo[0].astype(jnp.float32)), np.asarray(rv.astype(jnp.float32)))
    pos = jnp.asarray(rng.integers(0, 500, t), jnp.int32)
    ko, _ = write_kv(k, v, kn, vn, slots, layer=jnp.int32(1), rope_positions=pos, rope_theta=5000.0,
                     num_programs=2, interpret=True)
    rk, _ = ref.write_kv(k[1], v[1], ref.apply_rope(kn, pos, theta=5000.0), vn, slots)
    # The rotation in f32 either way; a rounding-boundary value may land one e4m3 step apart.
    np.testing.assert_allclose(np.asarray(ko[1].astype(jnp.float32)), np.asarray(rk.astype(jnp.float32)),
                               rtol=0.07, atol=1e-3)
