"""Chunked-prefill attention over the paged cache, ragged across one dense batch.

Each token t attends keys [0, positions[t]] of its request token_seq[t]: full over
the cached prefix, causal inside the new chunk (whose K/V are already in the pages).
The batch is cut into query blocks of up to BQ consecutive tokens of ONE request
(a block never straddles two requests); work item = (query block, KV head), and the
G query heads of that KV head ride along as extra rows, so K/V are read once per block.
Tokens with a negative position (decode rows in a mixed batch) are skipped: their rows
of the output keep the values passed in, so the decode kernel's output needs no merge.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import cdiv, persistent_loop, resolve_programs, triton_params
from pallas_kernels.paged_attention_common import attend_paged, finish, flat_pages, group_rows


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
                    base_ref, o_ref, *, num_kv: int, group: int, gp: int, bq: int, bk: int,
                    page_size: int, scale: float) -> None:
    del base_ref  # aliased to o_ref: rows this kernel does not store keep its values
    rows = bq * gp
    d = q_ref.shape[2]
    r = jnp.arange(rows, dtype=jnp.int32)
    cols = jnp.arange(d, dtype=jnp.int32)[None, :]

    def item(w):
        b = w // num_kv
        kh = w % num_kv
        length = bl_ref[b]
        start = bs_ref[b]
        # Row r of the tile is token start + r // gp, query head kh * group + r % gp; the
        # gp - group padding rows and tokens past the block are masked off. Indices stay
        # distinct (never clamped): masked lanes touch no memory on the GPU, and in the
        # interpreter a masked store writes back what it read, so a clamped duplicate
        # could undo a real row's store.
        valid = (r // gp < length) & (r % gp < group)
        tok = start + r // gp
        head = kh * group + r % gp
        limit = pltriton.load(pos_ref.at[tok], mask=valid, other=-1)

        @pl.when(jnp.max(limit) >= 0)  # a block of decode rows (position -1) does nothing
        def _():
            seq = bseq_ref[b]
            hi = jnp.minimum(jnp.max(limit) + 1, ctx_ref[seq])
            at = (tok[:, None], head[:, None], cols)
            q = pltriton.load(q_ref.at[at], mask=valid[:, None], other=0)
            acc, _, l = attend_paged(q, limit, k_ref, v_ref, bt_ref, seq, kh, 0, hi, bk=bk,
                                     page_size=page_size, scale=scale)
            out = finish(acc, l).astype(o_ref.dtype)
            pltriton.store(o_ref.at[at], out, mask=(limit >= 0)[:, None])

    persistent_loop(bl_ref.shape[0] * num_kv, item)


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            token_seq: jax.Array, positions: jax.Array, block_table: jax.Array,
                            context_len: jax.Array, *, scale: float,
                            num_programs: int | None = None, interpret: bool = False,
                            block_q: int | None = None, block_k: int = 128, num_warps: int = 8,
                            num_stages: int = 2, out: jax.Array | None = None) -> jax.Array:
    """Ragged prefill/mixed attention -> [T, H, D] in q.dtype.

    q [T, H, D]; k_pages, v_pages [P, ps, K, D] (one layer, this batch's K/V written);
    token_seq [T] (request row of each token), positions [T]; block_table [S, W];
    context_len [S]. Token t sees keys [0, min(positions[t], context_len-1)] of its
    request. A token with a negative position (a decode row, served by the decode kernel)
    is not computed: its output row is `out`'s (updated in place; None: zeros).
    `num_programs`: SM budget, any value >= 1. block_q (tokens per block, default
    128 // Gp, at least 1) times Gp (padded group size) rows form one tile; q and the
    output are read and written in their [T, H, D] layout, so no copy surrounds the kernel.
    The defaults (128-row tiles, 128-key blocks, 8 warps) are the fastest launch of
    `bench.kernels --sections prefill_configs` on an H100 (bench/RESULTS.md).
    """
    if (block_q is not None and block_q < 1) or block_k < 1:
        raise ValueError(f"block_q ({block_q}) and block_k ({block_k}) must be >= 1 (block_q=None: the default)")
    t, h, d = q.shape
    ps, num_kv = k_pages.shape[1], k_pages.shape[2]
    group = h // num_kv
    gp = group_rows(group, 1)
    bq = block_q or max(1, 128 // gp)
    if bq * gp < 16:  # Triton dots need >= 16 rows
        bq = cdiv(16, gp)
    max_blocks = min(t, cdiv(t, bq) + block_table.shape[0] + 1)
    start, length, seq = query_blocks(token_seq, bq, max_blocks)
    if out is None:
        out = jnp.zeros_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out has shape {out.shape}, want q's {q.shape}")
    progs = resolve_programs(num_programs, max_blocks * num_kv)
    kernel = functools.partial(_prefill_kernel, num_kv=num_kv, group=group, gp=gp, bq=bq, bk=block_k,
                               page_size=ps, scale=float(scale))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(progs,),
        input_output_aliases={9: 0},
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(q, flat_pages(k_pages), flat_pages(v_pages), positions.astype(jnp.int32), start, length, seq,
      block_table.astype(jnp.int32), context_len.astype(jnp.int32), out.astype(q.dtype))
