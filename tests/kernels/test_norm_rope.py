"""RMSNorm (plain and fused with the residual add) and RoPE, interpreted, vs jnp."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import apply_rope, reference as ref, rms_norm

from kernel_testing import assert_close, rand

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


@pytest.mark.parametrize("programs", [1, 3, 1000])
@pytest.mark.parametrize("t,e", [(1, 64), (13, 64), (7, 96)])  # one-pass (2^k) and chunked
def test_rms_norm(rng, programs, t, e):
    x, w = rand(rng, t, e), rand(rng, e)
    assert_close(rms_norm(x, w, eps=1e-5, num_programs=programs, interpret=True),
                 ref.rms_norm(x, w, eps=1e-5))


@pytest.mark.parametrize("programs", [1, 5])
@pytest.mark.parametrize("e", [64, 96])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_fused_residual(rng, programs, e, dtype):
    x, r, w = rand(rng, 11, e, dtype=dtype), rand(rng, 11, e, dtype=dtype), rand(rng, e, dtype=dtype)
    y, h = rms_norm(x, w, eps=1e-6, residual=r, num_programs=programs, interpret=True)
    ry, rh = ref.rms_norm(x, w, eps=1e-6, residual=r)
    assert y.dtype == dtype and h.dtype == dtype
    assert_close(h, rh)
    assert_close(y, ry)


@pytest.mark.parametrize("programs", [1, 3, 1000])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope(rng, programs, scaling):
    t, heads, d = 19, 3, 64
    x = rand(rng, t, heads, d)
    pos = jnp.asarray(rng.integers(0, 20000, t), jnp.int32)  # beyond the original context
    out = apply_rope(x, pos, theta=500000.0, scaling=scaling, num_programs=programs,
                     interpret=True, block_tokens=8)
    assert_close(out, ref.apply_rope(x, pos, theta=500000.0, scaling=scaling))


def test_rope_bf16_and_position_zero_is_identity(rng):
    x = rand(rng, 5, 2, 32, dtype=jnp.bfloat16)
    zero = apply_rope(x, jnp.zeros(5, jnp.int32), theta=1e4, num_programs=2, interpret=True)
    np.testing.assert_array_equal(np.asarray(zero, np.float32), np.asarray(x, np.float32))
    pos = jnp.arange(5, dtype=jnp.int32) * 100
    assert_close(apply_rope(x, pos, theta=1e4, num_programs=2, interpret=True),
                 ref.apply_rope(x, pos, theta=1e4))


def test_llama3_scaling_changes_only_low_frequencies():
    plain = np.asarray(ref.rope_inv_freq(128, 500000.0))
    scaled = np.asarray(ref.rope_inv_freq(128, 500000.0, LLAMA3))
    assert scaled[0] == plain[0]  # highest frequency kept
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # lowest slowed by factor
