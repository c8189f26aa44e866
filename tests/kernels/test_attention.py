"""Paged decode and chunked-prefill attention, interpreted, vs the jnp reference.

Block tables are shuffled, contexts ragged (1 token, page multiples and not), GQA
groups that are not powers of two, and program counts from 1 to more than the items.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention, paged_prefill_attention, reference as ref
from pallas_kernels._common import num_sms
from pallas_kernels.decode_attention import default_splits

from kernel_testing import assert_close, rand, shuffled_pages

PS = 16


def _cache(rng, num_pages, kv_heads, d, dtype):
    return (rand(rng, num_pages, PS, kv_heads, d, dtype=dtype),
            rand(rng, num_pages, PS, kv_heads, d, dtype=dtype))


@pytest.mark.parametrize("programs,splits,heads,kv_heads,block_k",
                         [(1, None, 8, 2, 32), (3, 1, 6, 2, 32), (5, 3, 8, 2, 32), (1000, 4, 6, 2, 32),
                          (2, None, 8, 2, 128),  # 128: several pages per key block
                          (3, 2, 2, 2, 32), (2, None, 16, 2, 32)])  # G = 1 and 8: 16 / 2 rows of partials
def test_decode(rng, programs, splits, heads, kv_heads, block_k):
    d, w = 32, 7
    ctx = np.array([1, 16, 37, 0, 112, 65])  # 0 = padding row
    n = len(ctx)
    k, v = _cache(rng, n * w + 3, kv_heads, d, jnp.float32)
    bt = shuffled_pages(rng, n, w, n * w + 3)
    q = rand(rng, n, heads, d)
    ctx = jnp.asarray(ctx, jnp.int32)
    out = paged_decode_attention(q, k, v, bt, ctx, scale=d ** -0.5, num_programs=programs,
                                 num_splits=splits, interpret=True, block_k=block_k)
    assert_close(out, ref.paged_decode_attention(q, k, v, bt, ctx, scale=d ** -0.5))
    assert np.all(np.asarray(out[3]) == 0), "a context-0 (padding) row must give zeros"


def _decode_grid(**kw) -> tuple[int, ...]:
    q, k = jnp.zeros((6, 8, 32)), jnp.zeros((43, PS, 2, 32))
    bt, ctx = jnp.zeros((6, 7), jnp.int32), jnp.full((6,), 100, jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *a: paged_decode_attention(*a, scale=1.0, interpret=True, **kw))(q, k, k, bt, ctx)
    (call,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    return call.params["grid_mapping"].grid


def test_decode_grid_is_the_sm_budget():
    """An explicit num_programs is the grid (a share of the SMs stays a share); several
    programs an SM only when asked for, or on the whole GPU by default."""
    assert _decode_grid(num_programs=3) == (3,)
    assert _decode_grid(num_programs=3, programs_per_sm=2) == (6,)
    assert _decode_grid(num_programs=3, num_splits=1) == (3,)
    budget = 4 * num_sms()
    items = 6 * 2 * default_splits(6, 2, 7 * PS, budget, 64)  # rows x KV heads x splits
    assert _decode_grid() == (min(budget, items),)


def test_decode_reads_no_key_past_the_context(rng):
    """Keys past a request's context in its ragged last block are never loaded: NaN there
    (stale or freed cache slots) cannot reach the output (p * V would be 0 * NaN). Also
    several programs per SM of the budget."""
    d, w, kv_heads = 32, 5, 2
    ctx = np.array([3, 17, 40, 80])  # 80 fills the table; the others end mid-block
    n = len(ctx)
    k, v = _cache(rng, n * w + 1, kv_heads, d, jnp.float32)
    bt = shuffled_pages(rng, n, w, n * w + 1)
    table = np.asarray(bt)
    for i, c in enumerate(ctx):
        for p in range(c, w * PS):
            k = k.at[table[i, p // PS], p % PS].set(jnp.nan)
            v = v.at[table[i, p // PS], p % PS].set(jnp.nan)
    q = rand(rng, n, 8, d)
    ctx = jnp.asarray(ctx, jnp.int32)
    for block_k, programs_per_sm in ((64, 1), (32, 3)):
        out = paged_decode_attention(q, k, v, bt, ctx, scale=d ** -0.5, num_programs=2, interpret=True,
                                     block_k=block_k, programs_per_sm=programs_per_sm)
        assert np.isfinite(np.asarray(out)).all()
        assert_close(out, ref.paged_decode_attention(q, jnp.nan_to_num(k), jnp.nan_to_num(v), bt, ctx,
                                                     scale=d ** -0.5))


def test_decode_bf16_long_context(rng):
    n, heads, kv_heads, d, w = 3, 4, 1, 64, 20
    k, v = _cache(rng, n * w + 1, kv_heads, d, jnp.bfloat16)
    bt = shuffled_pages(rng, n, w, n * w + 1)
    q = rand(rng, n, heads, d, dtype=jnp.bfloat16)
    ctx = jnp.asarray([319, 200, 5], jnp.int32)
    out = paged_decode_attention(q, k, v, bt, ctx, scale=0.125, num_programs=4, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref.paged_decode_attention(q, k, v, bt, ctx, scale=0.125))


def _mixed_batch(requests, pad):
    """Flat token arrays for requests given as (cached prefix, new tokens)."""
    seq, pos = [], []
    for s, (cached, new) in enumerate(requests):
        seq += [s] * new
        pos += list(range(cached, cached + new))
    seq += [0] * pad  # padding tokens (row 0, position 0), as the engine pads
    pos += [0] * pad
    ctx = [c + n for c, n in requests]
    return jnp.asarray(seq, jnp.int32), jnp.asarray(pos, jnp.int32), ctx


@pytest.mark.parametrize("programs,block_q,heads,kv_heads",
                         [(1, None, 8, 2), (3, 4, 9, 3), (7, 2, 8, 2), (1000, 8, 9, 3)])
def test_prefill_ragged(rng, programs, block_q, heads, kv_heads):
    # decodes first (1 new token), then chunks: fresh, with a prefix, page-aligned, ragged
    requests = [(40, 1), (0, 1), (0, 23), (31, 9), (16, 16), (5, 1)]
    seq, pos, ctx = _mixed_batch(requests, pad=3)
    d, w, s = 32, 4, len(requests) + 2
    ctx = jnp.asarray(ctx + [0] * (s - len(requests)), jnp.int32)
    k, v = _cache(rng, s * w + 2, kv_heads, d, jnp.float32)
    bt = shuffled_pages(rng, s, w, s * w + 2)
    q = rand(rng, seq.shape[0], heads, d)
    out = paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=d ** -0.5,
                                  num_programs=programs, block_q=block_q, interpret=True,
                                  block_k=32)
    assert_close(out, ref.paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=d ** -0.5))


def test_prefill_bf16_single_request(rng):
    seq, pos, ctx = _mixed_batch([(50, 30)], pad=0)
    heads, kv_heads, d, w = 4, 2, 64, 6
    k, v = _cache(rng, w + 1, kv_heads, d, jnp.bfloat16)
    bt = shuffled_pages(rng, 1, w, w + 1)
    q = rand(rng, 30, heads, d, dtype=jnp.bfloat16)
    ctx = jnp.asarray(ctx, jnp.int32)
    out = paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=0.125, num_programs=2,
                                  interpret=True)
    assert_close(out, ref.paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=0.125))


@pytest.mark.parametrize("heads,kv_heads,block_q", [(8, 2, None), (9, 3, 3)])
def test_prefill_leaves_negative_position_rows_to_out(rng, heads, kv_heads, block_q):
    """Decode rows of a mixed batch come with position -1: the kernel computes none of
    them and leaves their rows of `out` as passed (the decode kernel's output), and
    computes every other row as the reference does; without `out` those rows are zeros."""
    requests = [(40, 1), (12, 1), (0, 23), (31, 9), (5, 1)]
    seq, pos, ctx = _mixed_batch(requests, pad=2)
    is_dec = jnp.asarray([1, 1] + [0] * (seq.shape[0] - 2), bool)
    d, w, s = 32, 4, len(requests)
    ctx = jnp.asarray(ctx, jnp.int32)
    k, v = _cache(rng, s * w + 2, kv_heads, d, jnp.float32)
    bt = shuffled_pages(rng, s, w, s * w + 2)
    q, base = rand(rng, seq.shape[0], heads, d), rand(rng, seq.shape[0], heads, d)
    masked_pos = jnp.where(is_dec, -1, pos)
    want = ref.paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=d ** -0.5)
    out = paged_prefill_attention(q, k, v, seq, masked_pos, bt, ctx, scale=d ** -0.5, num_programs=3,
                                  block_q=block_q, block_k=32, interpret=True, out=base)
    np.testing.assert_array_equal(np.asarray(out[:2]), np.asarray(base[:2]))
    assert_close(out[2:], want[2:])
    zeros = paged_prefill_attention(q, k, v, seq, masked_pos, bt, ctx, scale=d ** -0.5, num_programs=3,
                                    block_q=block_q, block_k=32, interpret=True)
    assert not np.asarray(zeros[:2]).any()
    assert_close(zeros[2:], want[2:])
    with pytest.raises(ValueError, match="out has shape"):
        paged_prefill_attention(q, k, v, seq, masked_pos, bt, ctx, scale=1.0, interpret=True, out=base[1:])


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
def test_decode_and_prefill_read_an_fp8_cache(rng, q_dtype):
    """An fp8 (e4m3) cache is widened to q's dtype as it is read: both kernels equal the
    reference on the same fp8 values."""
    fp8 = jnp.float8_e4m3fn
    heads, kv_heads, d, w = 8, 2, 32, 5
    requests = [(40, 1), (0, 23), (31, 9)]
    seq, pos, ctx = _mixed_batch(requests, pad=2)
    n = len(requests)
    k, v = (rand(rng, n * w + 1, PS, kv_heads, d, scale=4.0).astype(fp8) for _ in range(2))
    bt = shuffled_pages(rng, n, w, n * w + 1)
    ctx = jnp.asarray(ctx, jnp.int32)
    q = rand(rng, seq.shape[0], heads, d, dtype=q_dtype)
    out = paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=d ** -0.5, num_programs=3, interpret=True,
                                  block_k=32)
    assert out.dtype == q_dtype
    assert_close(out, ref.paged_prefill_attention(q, k, v, seq, pos, bt, ctx, scale=d ** -0.5))
    qd = rand(rng, n, heads, d, dtype=q_dtype)
    out = paged_decode_attention(qd, k, v, bt, ctx, scale=d ** -0.5, num_programs=2, interpret=True)
    assert_close(out, ref.paged_decode_attention(qd, k, v, bt, ctx, scale=d ** -0.5))
