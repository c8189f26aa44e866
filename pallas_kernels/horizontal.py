"""Horizontal fusion: a GEMM and paged decode attention in ONE launch, on disjoint programs.

NanoFlow runs a compute-bound GEMM of one nano-batch beside the memory-bound decode
attention of another, each on a share of the SMs. Two kernels of one JAX program only
overlap through stream regions, whose order XLA decides; one kernel whose programs
[0, gemm_programs) compute GEMM tiles and whose programs [gemm_programs, total) compute
attention items runs both at once by construction. Both halves are the repository's own
Triton-lowered kernels (`gemm_triton`'s tile loop, `decode_attention`'s item loop), each
looping over its work with its own program range, so the fused launch computes exactly
what the two launches compute.

The launch shares one set of Triton parameters (warps, pipeline stages), and the GPU
gives every program the larger half's registers and shared memory, so an SM holds as
many programs as the GEMM's tiles allow. `bench.overlap --mechanisms fused` measures it
against the two kernels back to back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import pick_block, triton_params
from pallas_kernels.decode_attention import MIN_ROWS, _decode_kernel
from pallas_kernels.gemm_triton import _gemm_kernel
from pallas_kernels.paged_attention_common import flat_pages, group_rows


def _fused_kernel(x_ref, w_ref, q_ref, k_ref, v_ref, bt_ref, ctx_ref, y_ref, o_ref, *, gemm_programs: int,
                  attention_programs: int, gemm: dict, attention: dict) -> None:
    pid = pl.program_id(0)   # read here: the interpreter resolves it only outside the branches

    @pl.when(pid < gemm_programs)
    def _() -> None:
        _gemm_kernel(x_ref, w_ref, y_ref, programs=(pid, gemm_programs), **gemm)

    @pl.when(pid >= gemm_programs)
    def _() -> None:
        _decode_kernel(q_ref, k_ref, v_ref, bt_ref, ctx_ref, o_ref,
                       programs=(pid - gemm_programs, attention_programs), **attention)


def gemm_beside_decode_attention(x: jax.Array, w: jax.Array, q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                 block_table: jax.Array, context_len: jax.Array, *, scale: float,
                                 gemm_programs: int, attention_programs: int, block_m: int = 128,
                                 block_n: int = 128, block_k: int = 64, attention_block_k: int = 64,
                                 num_warps: int = 8, num_stages: int = 2,
                                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x @ w, decode attention) from one launch of gemm_programs + attention_programs programs.

    x [M, K] @ w [K, N] -> [M, N] in x.dtype, M a multiple of block_m (or smaller than it)
    and N, K multiples of power-of-two blocks; the attention's arguments and result are
    `paged_decode_attention`'s (q [N, H, D], k_pages / v_pages [P, ps, K, D], block_table
    [N, W], context_len [N] -> [N, H, D] in q.dtype), one work item per (request, KV head).
    """
    if gemm_programs < 1 or attention_programs < 1:
        raise ValueError(f"gemm_programs ({gemm_programs}) and attention_programs ({attention_programs}) "
                         "must both be >= 1")
    m, k = x.shape
    n = w.shape[1]
    bm = min(block_m, max(16, 1 << (m - 1).bit_length()))
    bn, bk = pick_block(n, (block_n, 64, 32, 16)), pick_block(k, (block_k, 32, 16))
    if m % bm or bn is None or bk is None:
        raise ValueError(f"GEMM shape {m} x {k} x {n} does not tile: M must be a multiple of {bm} and N, K "
                         "multiples of 16 (pad them, or use pallas_kernels.gemm)")
    heads, num_kv = q.shape[1], k_pages.shape[2]
    gemm = dict(bm=bm, bn=bn, bk=bk, k_dim=k, num_m=m // bm, num_tiles=(m // bm) * (n // bn), has_bias=False,
                has_res=False, silu_mul=False)
    attention = dict(num_kv=num_kv, num_splits=1, group=heads // num_kv, gp=group_rows(heads // num_kv, MIN_ROWS),
                     bk=attention_block_k, page_size=k_pages.shape[1], scale=float(scale))
    kernel = functools.partial(_fused_kernel, gemm_programs=gemm_programs, attention_programs=attention_programs,
                               gemm=gemm, attention=attention)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, n), x.dtype), jax.ShapeDtypeStruct(q.shape, q.dtype)),
        grid=(gemm_programs + attention_programs,),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="gemm_beside_decode_attention",
    )(x, w, q, flat_pages(k_pages), flat_pages(v_pages), block_table.astype(jnp.int32),
      context_len.astype(jnp.int32))
