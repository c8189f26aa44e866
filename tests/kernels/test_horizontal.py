"""The horizontally fused launch (a GEMM beside decode attention), interpreted: both results
equal the references whatever the split of programs between the two halves."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.horizontal import gemm_beside_decode_attention

from kernel_testing import assert_close, rand, shuffled_pages

PS = 4


@pytest.mark.parametrize("gemm_programs,attention_programs", [(1, 1), (3, 2), (2, 7), (40, 40)])
def test_both_halves_match_their_references(rng, gemm_programs, attention_programs):
    m, k, n = 48, 64, 96            # 3 x 3 tiles of 16 x 32 (more or fewer than the GEMM's programs)
    heads, kv_heads, d, w = 6, 2, 16, 5
    ctx = np.array([1, 7, 20, 0, 13])   # 0: a padding row (zeros)
    x, wt = rand(rng, m, k), rand(rng, k, n)
    pages = len(ctx) * w + 2
    kc, vc = rand(rng, pages, PS, kv_heads, d), rand(rng, pages, PS, kv_heads, d)
    bt = shuffled_pages(rng, len(ctx), w, pages)
    q = rand(rng, len(ctx), heads, d)
    ctx = jnp.asarray(ctx, jnp.int32)
    y, o = gemm_beside_decode_attention(x, wt, q, kc, vc, bt, ctx, scale=d ** -0.5, gemm_programs=gemm_programs,
                                        attention_programs=attention_programs, block_m=16, block_n=32,
                                        block_k=16, attention_block_k=8, interpret=True)
    assert_close(y, ref.gemm(x, wt))
    assert_close(o, ref.paged_decode_attention(q, kc, vc, bt, ctx, scale=d ** -0.5))
    assert np.all(np.asarray(o[3]) == 0)


def test_bad_launches_are_refused():
    x, q = jnp.zeros((48, 64)), jnp.zeros((2, 4, 16))
    kc, bt, ctx = jnp.zeros((5, PS, 2, 16)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="must both be >= 1"):
        gemm_beside_decode_attention(x, jnp.zeros((64, 32)), q, kc, kc, bt, ctx, scale=1.0, gemm_programs=0,
                                     attention_programs=4, interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        gemm_beside_decode_attention(x, jnp.zeros((64, 30)), q, kc, kc, bt, ctx, scale=1.0, gemm_programs=2,
                                     attention_programs=2, block_m=16, interpret=True)
