"""The inner loop both paged attention kernels share: online softmax over paged keys.

Keys are visited in blocks of `bk` positions. A block may span several pages; each
key row is fetched through the request's block table (a gather), so the block size
is independent of the page size and lengths need not be page multiples.
The caches are viewed as [num_pages * page_size, K, D] so a key at position p of
a request lives at row block_table[p // ps] * ps + p % ps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
NEG_INF = float("-inf")


def attend_paged(q: jax.Array, row_limit: jax.Array, k_ref: Any, v_ref: Any, bt_ref: Any,
                 seq: Any, kh: Any, key_lo: Any, key_hi: Any, *, bk: int, page_size: int,
                 scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attends q [R, D] to keys [key_lo, key_hi) of request `seq`, KV head `kh`.

    Row r only sees keys <= row_limit[r]. Returns the unnormalised output acc [R, D]
    and the running max m [R] and denominator l [R] (f32), for a later combine.
    Rows that see no key keep m = -inf, l = 0, acc = 0.
    """
    r, d = q.shape
    width = bt_ref.shape[1]
    cols = jnp.arange(d, dtype=jnp.int32)[None, :]  # all-array indices: a gather the interpreter takes
    span = jnp.maximum(key_hi - key_lo, 0)
    full, trips = span // bk, (span + bk - 1) // bk

    def step(j, carry, masked: bool):
        acc, m, l = carry
        key = key_lo + j * bk + jnp.arange(bk, dtype=jnp.int32)
        # Clamped so a block that runs past the table still reads a real (null) page.
        page = bt_ref[seq, jnp.minimum(key // page_size, width - 1)]
        rows = page * page_size + key % page_size
        if masked:
            # The ragged last block loads only keys below key_hi: masked lanes move no
            # bytes (a 640-key context in 256-key blocks would otherwise read 768 keys).
            live = (key < key_hi)[:, None]
            k = pltriton.load(k_ref.at[rows[:, None], kh, cols], mask=live, other=0.0)
            v = pltriton.load(v_ref.at[rows[:, None], kh, cols], mask=live, other=0.0)
        else:  # whole blocks: the plain row gather (unmasked loads are the faster path)
            k, v = k_ref[rows, kh, :], v_ref[rows, kh, :]
        k, v = k.astype(q.dtype), v.astype(q.dtype)   # an fp8 cache is widened in registers
        s = jnp.dot(q, k.T, preferred_element_type=F32) * scale
        ok = (key[None, :] <= row_limit[:, None]) & (key[None, :] < key_hi)
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with every key masked so far has m_new = -inf: keep its sums at 0, not NaN.
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
        return acc, m_new, l

    init = (jnp.zeros((r, d), F32), jnp.full((r,), NEG_INF, F32), jnp.zeros((r,), F32))
    carry = lax.fori_loop(0, full, lambda j, c: step(j, c, masked=False), init)
    return lax.fori_loop(full, trips, lambda j, c: step(j, c, masked=True), carry)  # 0 or 1 trip


def finish(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l, with 0 for rows that saw no key (padding rows, context 0)."""
    return acc / jnp.where(l == 0.0, 1.0, l)[:, None]


def group_rows(g: int, min_rows: int) -> int:
    """Rows a group of g query heads is padded to: a power of two >= min_rows."""
    return max(min_rows, 1 << (g - 1).bit_length())


def flat_pages(pages: jax.Array) -> jax.Array:
    """[P, ps, K, D] -> [P * ps, K, D] (free: a view of the same layout)."""
    return pages.reshape(pages.shape[0] * pages.shape[1], *pages.shape[2:])
