"""Persistent blocked GEMM through Pallas' Triton lowering, with fused epilogues.

Kept as the portable path (it runs in Pallas' generic interpreter on CPU) and as a
comparison for the Mosaic GPU GEMM, which is the fast one on Hopper.
Tiles are ordered with M fastest so that programs running at the same time share
one panel of the (large) weight matrix in L2.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import pad_axis, persistent_loop, pick_block, resolve_programs, triton_params

F32 = jnp.float32


def _gemm_kernel(*refs, bm: int, bn: int, bk: int, k_dim: int, num_m: int, num_tiles: int,
                 has_bias: bool, has_res: bool, silu_mul: bool, programs: tuple[Any, int] | None = None) -> None:
    refs = list(refs)
    x_ref = refs.pop(0)
    w_ref = refs.pop(0)
    u_ref = refs.pop(0) if silu_mul else None
    b_ref = refs.pop(0) if has_bias else None
    r_ref = refs.pop(0) if has_res else None
    (o_ref,) = refs

    def tile(t):
        m0 = (t % num_m) * bm
        n0 = (t // num_m) * bn

        def k_step(kk, accs):
            k0 = pl.multiple_of(kk * bk, bk)
            a = x_ref[pl.ds(m0, bm), pl.ds(k0, bk)]
            out = [accs[0] + jnp.dot(a, w_ref[pl.ds(k0, bk), pl.ds(n0, bn)], preferred_element_type=F32)]
            if silu_mul:
                out.append(accs[1] + jnp.dot(a, u_ref[pl.ds(k0, bk), pl.ds(n0, bn)],
                                             preferred_element_type=F32))
            return tuple(out)

        zero = jnp.zeros((bm, bn), F32)
        accs = lax.fori_loop(0, k_dim // bk, k_step, (zero, zero) if silu_mul else (zero,))
        acc = accs[0]
        if silu_mul:
            acc = acc / (1.0 + jnp.exp(-acc)) * accs[1]
        if has_bias:
            acc = acc + b_ref[pl.ds(n0, bn)].astype(F32)[None, :]
        if has_res:
            acc = acc + r_ref[pl.ds(m0, bm), pl.ds(n0, bn)].astype(F32)
        o_ref[pl.ds(m0, bm), pl.ds(n0, bn)] = acc.astype(o_ref.dtype)

    persistent_loop(num_tiles, tile, programs)


def gemm_triton(x: jax.Array, w: jax.Array, *, w_up: jax.Array | None = None,
                bias: jax.Array | None = None, residual: jax.Array | None = None,
                num_programs: int | None = None, interpret: bool = False,
                block_m: int = 128, block_n: int | None = None, block_k: int = 64,
                num_warps: int = 8, num_stages: int = 3) -> jax.Array:
    """x [M, K] @ w [K, N] (+bias)(+residual); with w_up: silu(x@w) * (x@w_up).

    M is padded to block_m; N and K are padded to a multiple of 16 only when no
    power-of-two block divides them (Triton tiles are powers of two).
    """
    m, k = x.shape
    n = w.shape[1]
    silu = w_up is not None
    if block_n is None:
        block_n = 128 if silu else 256
    bn = pick_block(n, (block_n, 128, 64, 32, 16))
    bk = pick_block(k, (block_k, 32, 16))
    if bn is None or bk is None:
        # Rare odd sizes: pad to 16 and retry, then cut the result back.
        wp = pad_axis(pad_axis(w, 0, 16), 1, 16)
        up = None if w_up is None else pad_axis(pad_axis(w_up, 0, 16), 1, 16)
        bp = None if bias is None else pad_axis(bias, 0, 16)
        rp = None if residual is None else pad_axis(residual, 1, 16)
        out = gemm_triton(pad_axis(x, 1, 16), wp, w_up=up, bias=bp, residual=rp,
                          num_programs=num_programs, interpret=interpret, block_m=block_m,
                          block_n=block_n, block_k=block_k, num_warps=num_warps,
                          num_stages=num_stages)
        return out[:, :n]
    bm = min(block_m, max(16, 1 << (m - 1).bit_length()))
    xp = pad_axis(x, 0, bm)
    rp = None if residual is None else pad_axis(residual, 0, bm)
    mp = xp.shape[0]
    num_m = mp // bm
    num_tiles = num_m * (n // bn)
    progs = resolve_programs(num_programs, num_tiles)
    args = [xp, w] + ([w_up] if silu else []) + ([bias] if bias is not None else []) + \
        ([rp] if residual is not None else [])
    kernel = functools.partial(_gemm_kernel, bm=bm, bn=bn, bk=bk, k_dim=k, num_m=num_m,
                               num_tiles=num_tiles, has_bias=bias is not None,
                               has_res=residual is not None, silu_mul=silu)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid=(progs,),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="gemm_silu_mul_triton" if silu else "gemm_triton",
    )(*args)
    return out[:m] if mp != m else out
