"""RMSNorm (plain and fused with the residual add) and RoPE, interpreted, vs jnp."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import apply_rope, reference as ref, rms_norm
from pallas_kernels.norm_rope import default_block_rows, rope_blocks, rope_defaults

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


@pytest.mark.parametrize("block_rows,num_warps,block_cols", [
    (1, 4, None), (4, 8, None), (16, 16, None),  # one pass from registers
    (16, 4, None), (4, 8, 32), (2, 8, 1024),  # chunked: over the register budget, forced, old path
])
@pytest.mark.parametrize("programs", [1, 2, 1000])
def test_rms_norm_knobs(rng, programs, block_rows, num_warps, block_cols):
    t, e = 21, 1024  # 21 rows: padding for every block_rows > 1; 16 x 1024 > 4 warps of registers
    x, r, w = (rand(rng, t, e, dtype=jnp.bfloat16), rand(rng, t, e, dtype=jnp.bfloat16),
               rand(rng, e, dtype=jnp.bfloat16))
    y, h = rms_norm(x, w, eps=1e-5, residual=r, num_programs=programs, interpret=True,
                    block_rows=block_rows, num_warps=num_warps, block_cols=block_cols)
    ry, rh = ref.rms_norm(x, w, eps=1e-5, residual=r)
    assert_close(h, rh)
    assert_close(y, ry)


def test_default_block_rows_fills_programs_with_large_items():
    assert default_block_rows(2048, 4096, 2, True, 132) == 4  # 64 KB items, ~4 a program
    assert default_block_rows(256, 4096, 2, True, 132) == 1  # every program gets an item
    assert default_block_rows(4096, 576, 2, False, 132) == 16  # capped


@pytest.mark.parametrize("programs", [1, 3, 1000])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope(rng, programs, scaling):
    t, heads, d = 19, 3, 64
    x = rand(rng, t, heads, d)
    pos = jnp.asarray(rng.integers(0, 20000, t), jnp.int32)  # beyond the original context
    out = apply_rope(x, pos, theta=500000.0, scaling=scaling, num_programs=programs,
                     interpret=True, block_tokens=8)
    assert_close(out, ref.apply_rope(x, pos, theta=500000.0, scaling=scaling))


@pytest.mark.parametrize("heads,hps,splits", [
    (9, 1, 1), (9, 3, None), (9, 8, 2),  # 8 -> 3 heads a step, 2 -> 3 groups in one item
    (6, 2, 3), (6, 4, 100), (3, 8, None),  # 4 -> 3, 100 -> 2 splits; all heads in one step
])
@pytest.mark.parametrize("programs", [1, 4, 1000])
def test_rope_heads_per_step_and_splits(rng, programs, heads, hps, splits):
    t, d = 13, 32  # 13 tokens: a padded last block
    x = rand(rng, t, heads, d, dtype=jnp.bfloat16)
    pos = jnp.asarray(rng.integers(0, 20000, t), jnp.int32)
    out = apply_rope(x, pos, theta=500000.0, scaling=LLAMA3, num_programs=programs, interpret=True,
                     block_tokens=4, num_warps=8, heads_per_step=hps, head_splits=splits)
    assert_close(out, ref.apply_rope(x, pos, theta=500000.0, scaling=LLAMA3))


def test_rope_blocks_round_to_divisors():
    assert rope_blocks(2048, 32, 128, 132) == (16, 8, 2)  # step of 16 x 8 x 128 elements
    assert rope_blocks(256, 8, 128, 132, block_tokens=32, heads_per_step=4) == (32, 4, 2)
    assert rope_blocks(5, 9, 64, 4, heads_per_step=8, head_splits=2) == (8, 3, 1)


def test_rope_defaults_switch_to_long_blocks_at_32_tokens_a_program():
    assert rope_defaults(2048, 132) == (None, 8, 4)  # the engine's batches: unchanged
    assert rope_defaults(32 * 132 - 1, 132) == (None, 8, 4)
    assert rope_defaults(32 * 132, 132) == (32, 4, 8)
    assert rope_defaults(16384, 132) == (64, 4, 8)  # 124 tokens a program -> 64 (capped)
    assert rope_defaults(100, 2) == (32, 4, 8)  # 50 -> the power of two below


@pytest.mark.parametrize("t", [64, 101])  # whole blocks; a padded last block
def test_rope_long_batch_defaults(rng, t):
    heads, d = 6, 32
    x = rand(rng, t, heads, d, dtype=jnp.bfloat16)
    pos = jnp.asarray(rng.integers(0, 20000, t), jnp.int32)
    out = apply_rope(x, pos, theta=500000.0, scaling=LLAMA3, num_programs=2, interpret=True)
    assert_close(out, ref.apply_rope(x, pos, theta=500000.0, scaling=LLAMA3))


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
