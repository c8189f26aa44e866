"""Paged decode attention (one query token per request), GQA, split-KV + combine.

Work item = (request, KV head, split): the split covers a contiguous range of the
request's keys, so long contexts spread over many programs and the memory-bound
stream of K/V pages keeps every SM of the budget busy. All G query heads of a KV
head are processed together, so each K/V byte is read once. The combine (a
log-sum-exp merge of the splits' partial results) is a small XLA reduction. With one
split (enough requests to fill the GPU: an engine's full decode batch) the kernel
normalizes and writes the [N, H, D] output itself, so no partials, combine or casts
surround it. q is read in its [N, H, D] layout in either case (no padded copy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import cdiv, persistent_loop, resolve_programs, num_sms, triton_params
from pallas_kernels.paged_attention_common import attend_paged, flat_pages, group_rows
from pallas_kernels.paged_attention_common import finish as normalized

F32 = jnp.float32
MIN_ROWS = 16  # tl.dot needs >= 16 rows: a query group is padded to that


def _decode_kernel(q_ref, k_ref, v_ref, bt_ref, ctx_ref, *out_refs, num_kv: int, num_splits: int,
                   group: int, gp: int, bk: int, page_size: int, scale: float,
                   programs: tuple[Any, int] | None = None) -> None:
    r = jnp.arange(gp, dtype=jnp.int32)
    cols = jnp.arange(q_ref.shape[2], dtype=jnp.int32)[None, :]
    real = (r < group)[:, None]   # the group's G heads of the tile's gp rows (a legal Triton dot)

    def item(w):
        n = w // (num_kv * num_splits)
        kh = (w // num_splits) % num_kv
        sp = w % num_splits
        ctx = ctx_ref[n]
        # Split lengths are whole key blocks so only the last block of a split is ragged.
        chunk = ((ctx + num_splits - 1) // num_splits + bk - 1) // bk * bk
        lo = sp * chunk
        hi = jnp.minimum(ctx, lo + chunk)
        # Row r is query head kh * G + r; rows past G are masked (distinct indices, never
        # clamped: masked lanes touch no memory on the GPU). The request index is broadcast
        # to an array too: the interpreter's gather takes all-array indices only.
        at = (n + 0 * r[:, None], kh * group + r[:, None], cols)
        q = pltriton.load(q_ref.at[at], mask=real, other=0)
        limit = jnp.full((gp,), ctx - 1, jnp.int32)
        acc, m, l = attend_paged(q, limit, k_ref, v_ref, bt_ref, n, kh, lo, hi, bk=bk,
                                 page_size=page_size, scale=scale)
        if num_splits == 1:
            (o_ref,) = out_refs
            pltriton.store(o_ref.at[at], normalized(acc, l).astype(o_ref.dtype), mask=real)
            return
        o_ref, m_ref, l_ref = out_refs
        rows = o_ref.shape[3]  # query heads kept of the group's padded rows (see _kept_rows)
        if rows < acc.shape[0]:  # drop the zero padding heads before they reach memory
            parts = acc.shape[0] // rows
            acc, m, l = (jnp.split(a, parts, axis=0)[0] for a in (acc, m, l))
        o_ref[n, kh, sp, :, :] = acc
        m_ref[n, kh, sp, :] = m
        l_ref[n, kh, sp, :] = l

    persistent_loop(ctx_ref.shape[0] * num_kv * num_splits, item, programs)


def _combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges splits: acc [N, K, S, G, D], m/l [N, K, S, G] -> [N, K, G, D]."""
    m_max = jnp.max(m, axis=2, keepdims=True)
    m_max = jnp.where(jnp.isinf(m_max), 0.0, m_max)
    wgt = jnp.where(l > 0, jnp.exp(m - m_max), 0.0)
    num = jnp.sum(acc * wgt[..., None], axis=2)
    den = jnp.sum(l * wgt, axis=2)
    return num / jnp.where(den == 0.0, 1.0, den)[..., None]


def _kept_rows(g: int, gp: int) -> int:
    """Rows of a group's partial results written out: the G real heads where the padded
    Gp rows split into equal power-of-two parts (Triton splits only those), else all Gp.
    With Llama-3-8B's G = 4 of 16 rows that is a quarter of the f32 partials' traffic
    (at 64 x 2048, 12.6 MB of writes against 268 MB of K/V)."""
    parts = gp // g
    return g if gp % g == 0 and parts & (parts - 1) == 0 else gp


def default_splits(n: int, num_kv: int, max_keys: int, programs: int, bk: int) -> int:
    """Enough (request, head, split) items for ~2 per program, no split shorter than a block."""
    want = cdiv(2 * programs, max(1, n * num_kv))
    return max(1, min(want, cdiv(max_keys, bk)))


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """One decode-attention launch, resolved from the shapes and the SM budget.

    `kernel(q, k_flat, v_flat, block_table, context_len)` is the bare `pallas_call`
    (no jnp helper around it), so a stream region (`compute_on`) may hold it alone;
    `prepare` and `finish` are the cheap jnp steps before and after it.
    """

    num_kv: int
    heads: int
    padded_rows: int   # rows a KV head's query group is padded to (a legal Triton dot)
    num_splits: int
    programs: int
    block_k: int
    num_warps: int
    num_stages: int
    page_size: int
    scale: float
    interpret: bool

    def prepare(self, q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                context_len: jax.Array) -> tuple[jax.Array, ...]:
        return (q, flat_pages(k_pages), flat_pages(v_pages), block_table.astype(jnp.int32),
                context_len.astype(jnp.int32))

    def kernel(self, q: jax.Array, k_flat: jax.Array, v_flat: jax.Array, block_table: jax.Array,
               context_len: jax.Array) -> tuple[jax.Array, ...]:
        """One split: (the output [N, H, D] in q's dtype,); several: the f32 partials
        (acc, m, l) that `finish` combines."""
        n, d = q.shape[0], q.shape[-1]
        group = self.heads // self.num_kv
        body = functools.partial(_decode_kernel, num_kv=self.num_kv, num_splits=self.num_splits, group=group,
                                 gp=self.padded_rows, bk=self.block_k, page_size=self.page_size, scale=self.scale)
        if self.num_splits == 1:
            out_shape: tuple[jax.ShapeDtypeStruct, ...] = (jax.ShapeDtypeStruct(q.shape, q.dtype),)
        else:
            part = (n, self.num_kv, self.num_splits, _kept_rows(group, self.padded_rows))
            out_shape = (jax.ShapeDtypeStruct(part + (d,), F32), jax.ShapeDtypeStruct(part, F32),
                         jax.ShapeDtypeStruct(part, F32))
        return tuple(pl.pallas_call(
            body,
            out_shape=out_shape,
            grid=(self.programs,),
            compiler_params=triton_params(self.num_warps, self.num_stages),
            interpret=self.interpret,
            name="paged_decode_attention",
        )(q, k_flat, v_flat, block_table, context_len))

    def finish(self, parts: tuple[jax.Array, ...], dtype: jnp.dtype) -> jax.Array:
        if self.num_splits == 1:
            return parts[0].astype(dtype)
        acc, m, l = parts
        out = _combine(acc, m, l)[:, :, : self.heads // self.num_kv]
        return out.reshape(out.shape[0], self.heads, out.shape[-1]).astype(dtype)


def decode_launch(q_shape: tuple[int, ...], k_pages_shape: tuple[int, ...], max_blocks: int, *,
                  scale: float, num_programs: int | None = None, num_splits: int | None = None,
                  interpret: bool = False, block_k: int | None = None, num_warps: int = 4,
                  num_stages: int | None = None, programs_per_sm: int | None = None) -> DecodeLaunch:
    """The launch `paged_decode_attention` makes for these shapes (arguments as there)."""
    if programs_per_sm is None:
        programs_per_sm = 4 if num_programs is None else 1
    if programs_per_sm < 1:
        raise ValueError(f"programs_per_sm must be >= 1, got {programs_per_sm}")
    if block_k is None:
        block_k = 64 if programs_per_sm > 1 else 256
    if num_stages is None:
        num_stages = 2 if programs_per_sm > 1 else 3
    n, h, _ = q_shape
    ps, num_kv = k_pages_shape[1], k_pages_shape[2]
    gp = group_rows(h // num_kv, MIN_ROWS)
    progs_budget = (num_programs if num_programs is not None else num_sms()) * programs_per_sm
    if num_splits is None:
        num_splits = default_splits(n, num_kv, max_blocks * ps, progs_budget, block_k)
    progs = resolve_programs(progs_budget, n * num_kv * num_splits)
    return DecodeLaunch(num_kv=num_kv, heads=h, padded_rows=gp, num_splits=num_splits, programs=progs,
                        block_k=block_k, num_warps=num_warps, num_stages=num_stages, page_size=ps,
                        scale=float(scale), interpret=interpret)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_table: jax.Array, context_len: jax.Array, *, scale: float,
                           num_programs: int | None = None, num_splits: int | None = None,
                           interpret: bool = False, block_k: int | None = None, num_warps: int = 4,
                           num_stages: int | None = None, programs_per_sm: int | None = None) -> jax.Array:
    """Decode attention on the paged cache -> [N, H, D] in q.dtype.

    q [N, H, D]; k_pages, v_pages [P, ps, K, D] (one layer); block_table [N, W] int32;
    context_len [N] int32 (keys 0..context_len-1 are attended; 0 marks a padding row,
    whose output is zeros). `num_programs` is the grid: an SM budget, one program an SM
    (any value >= 1; None: the whole GPU, `programs_per_sm` programs an SM).
    `num_splits` (default: about two work items per program) splits each context.
    programs_per_sm: programs launched per SM of the budget (default: 4 on the whole GPU,
    1 under an explicit budget, so a share of the SMs stays a share). One program per SM
    streams one item's blocks at a time, so short contexts (few blocks an item) wait on
    memory latency; several resident programs keep more loads in flight.
    block_k / num_stages default to what is fastest for that launch on an H200
    (`bench.kernels --sections decode_configs`; bench/RESULTS.md, decode attention):
    with several programs an SM, 64-key blocks in 2 stages (short blocks keep many
    programs resident); with one, 256-key blocks in 3 stages (long blocks keep one
    program's loads in flight).
    """
    launch = decode_launch(q.shape, k_pages.shape, block_table.shape[1], scale=scale,
                           num_programs=num_programs, num_splits=num_splits, interpret=interpret,
                           block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                           programs_per_sm=programs_per_sm)
    parts = launch.kernel(*launch.prepare(q, k_pages, v_pages, block_table, context_len))
    return launch.finish(parts, q.dtype)
