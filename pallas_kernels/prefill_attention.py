"""Chunked-prefill attention over the paged cache, ragged across one dense batch.

Each token t attends keys [0, positions[t]] of its request token_seq[t]: full over
the cached prefix, causal inside the new chunk (whose K/V are already in the pages).
The batch is cut into query blocks of up to BQ consecutive tokens of ONE request
(a block never straddles two requests); work item = (query block, KV head), and the
G query heads of that KV head ride along as extra rows, so K/V are read once per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import cdiv, persistent_loop, resolve_programs, triton_params
from pallas_kernels.paged_attention_common import attend_paged, finish, flat_pages, group_queries


def query_blocks(token_seq: jax.Array, bq: int, max_blocks: int) -> tuple[jax.Array, ...]:
    """Cuts tokens into blocks of <= bq consecutive tokens of one request (jnp, cheap).

    Returns (start, length, seq) each [max_blocks]; unused blocks have length 0.
    Tokens of one request are contiguous in a dense batch, so runs of equal
    token_seq are requests (trailing padding forms its own harmless run).
    """
    t = token_seq.shape[0]
    idx = jnp.arange(t, dtype=jnp.int32)
    new_run = jnp.concatenate([jnp.ones((1,), bool), token_seq[1:] != token_seq[:-1]])
    run_start = jax.lax.cummax(jnp.where(new_run, idx, 0))
    opens = (idx - run_start) % bq == 0
    block_id = jnp.cumsum(opens.astype(jnp.int32)) - 1
    start = jnp.zeros((max_blocks,), jnp.int32).at[jnp.where(opens, block_id, max_blocks)].set(
        idx, mode="drop")
    length = jnp.zeros((max_blocks,), jnp.int32).at[block_id].add(1, mode="drop")
    seq = token_seq.astype(jnp.int32)[start]
    return start, length, seq


def _prefill_kernel(q_ref, k_ref, v_ref, pos_ref, bs_ref, bl_ref, bseq_ref, bt_ref, ctx_ref,
                    o_ref, *, num_kv: int, gp: int, bq: int, bk: int, page_size: int,
                    scale: float) -> None:
    rows = bq * gp

    def item(w):
        b = w // num_kv
        kh = w % num_kv
        length = bl_ref[b]

        @pl.when(length > 0)
        def _():
            start = bs_ref[b]
            seq = bseq_ref[b]
            r = jnp.arange(rows, dtype=jnp.int32)
            valid = r // gp < length
            row_pos = pos_ref[start + r // gp]
            limit = jnp.where(valid, row_pos, -1)
            hi = jnp.minimum(jnp.max(limit) + 1, ctx_ref[seq])
            q = q_ref[kh, pl.ds(start * gp, rows), :]
            acc, _, l = attend_paged(q, limit, k_ref, v_ref, bt_ref, seq, kh, 0, hi, bk=bk,
                                     page_size=page_size, scale=scale)
            out = finish(acc, l).astype(o_ref.dtype)
            pltriton.store(o_ref.at[kh, pl.ds(start * gp, rows), :], out, mask=valid[:, None])

    persistent_loop(bl_ref.shape[0] * num_kv, item)


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            token_seq: jax.Array, positions: jax.Array, block_table: jax.Array,
                            context_len: jax.Array, *, scale: float,
                            num_programs: int | None = None, interpret: bool = False,
                            block_q: int | None = None, block_k: int = 64, num_warps: int = 4,
                            num_stages: int = 2) -> jax.Array:
    """Ragged prefill/mixed attention -> [T, H, D] in q.dtype.

    q [T, H, D]; k_pages, v_pages [P, ps, K, D] (one layer, this batch's K/V written);
    token_seq [T] (request row of each token), positions [T]; block_table [S, W];
    context_len [S]. Token t sees keys [0, min(positions[t], context_len-1)] of its
    request. `num_programs`: SM budget, any value >= 1. block_q (tokens per block,
    default 64 // Gp, at least 1) times Gp (padded group size) rows form one tile.
    """
    t, h, d = q.shape
    ps, num_kv = k_pages.shape[1], k_pages.shape[2]
    qg, gp = group_queries(q, num_kv, min_rows=1)
    bq = block_q or max(1, 64 // gp)
    if bq * gp < 16:  # Triton dots need >= 16 rows
        bq = cdiv(16, gp)
    max_blocks = min(t, cdiv(t, bq) + block_table.shape[0] + 1)
    start, length, seq = query_blocks(token_seq, bq, max_blocks)
    # [K, (T + bq) * Gp, D]: the padding lets the last block's tile stay in bounds.
    qk = jnp.pad(qg, ((0, bq), (0, 0), (0, 0), (0, 0))).transpose(1, 0, 2, 3)
    qk = qk.reshape(num_kv, (t + bq) * gp, d)
    pos = jnp.pad(positions.astype(jnp.int32), (0, bq))
    progs = resolve_programs(num_programs, max_blocks * num_kv)
    kernel = functools.partial(_prefill_kernel, num_kv=num_kv, gp=gp, bq=bq, bk=block_k,
                               page_size=ps, scale=float(scale))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
        grid=(progs,),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(qk, flat_pages(k_pages), flat_pages(v_pages), pos, start, length, seq,
      block_table.astype(jnp.int32), context_len.astype(jnp.int32))
    out = out.reshape(num_kv, t + bq, gp, d)[:, :t, : h // num_kv].transpose(1, 0, 2, 3)
    return out.reshape(t, h, d)
