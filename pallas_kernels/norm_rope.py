"""RMSNorm (optionally fused with the residual add) and RoPE, persistent Triton kernels.

Both are memory-bound streams. Rows are processed in blocks of `br`; the hidden
dim in power-of-two chunks (Triton tiles are powers of two, while hidden sizes such
as 576 are not), so RMSNorm makes two passes over a row block: sum of squares, then
scale. The second pass re-reads the block from L2, not from HBM. A power-of-two
hidden size up to 8192 is done in one pass from registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (next_pow2, num_sms, pad_axis, persistent_loop, pick_block,
                                     resolve_programs, triton_params)
from pallas_kernels.reference import rope_inv_freq

F32 = jnp.float32
_CHUNKS = (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def _rms_kernel(*refs, br: int, bc: int, eps: float, has_res: bool) -> None:
    if has_res:
        x_ref, r_ref, w_ref, y_ref, h_ref = refs
    else:
        (x_ref, w_ref, y_ref), r_ref, h_ref = refs, None, None
    e = x_ref.shape[1]
    chunks = e // bc

    def one_pass(b):
        # The whole row block fits in registers: read once, write once.
        rows = pl.ds(b * br, br)
        h = x_ref[rows, :].astype(F32)
        if has_res:
            h = h + r_ref[rows, :].astype(F32)
            h_ref[rows, :] = h.astype(h_ref.dtype)
            h = h.astype(h_ref.dtype).astype(F32)  # normalise the rounded sum, like the model
        inv = lax.rsqrt(jnp.sum(h * h, axis=1) / e + eps)
        y_ref[rows, :] = (h * inv[:, None] * w_ref[...].astype(F32)[None, :]).astype(y_ref.dtype)

    def block(b):
        rows = pl.ds(b * br, br)

        def sumsq(c, acc):
            cols = pl.ds(c * bc, bc)
            h = x_ref[rows, cols].astype(F32)
            if has_res:
                h = h + r_ref[rows, cols].astype(F32)
                h_ref[rows, cols] = h.astype(h_ref.dtype)
                h = h.astype(h_ref.dtype).astype(F32)
            return acc + jnp.sum(h * h, axis=1)

        ss = lax.fori_loop(0, chunks, sumsq, jnp.zeros((br,), F32))
        inv = lax.rsqrt(ss / e + eps)

        def scale(c, carry):
            cols = pl.ds(c * bc, bc)
            # The fused path normalises the rounded sum it stored, like the unfused model.
            h = (h_ref if has_res else x_ref)[rows, cols].astype(F32)
            y_ref[rows, cols] = (h * inv[:, None] * w_ref[cols].astype(F32)[None, :]).astype(y_ref.dtype)
            return carry

        lax.fori_loop(0, chunks, scale, jnp.int32(0))

    persistent_loop(x_ref.shape[0] // br, one_pass if chunks == 1 else block)


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, residual: jax.Array | None = None,
             num_programs: int | None = None, interpret: bool = False, block_rows: int = 2,
             num_warps: int = 8) -> jax.Array | tuple[jax.Array, jax.Array]:
    """RMSNorm of x [T, E] with weight w [E] -> y [T, E] in x.dtype.

    With `residual` [T, E]: h = x + residual is normalised and (y, h) is returned
    (h is the new residual stream), in one pass over memory.
    """
    t, e = x.shape
    br = min(block_rows, 1 << (t - 1).bit_length()) if t > 0 else 1
    bc = pick_block(e, _CHUNKS)
    xp = pad_axis(x, 0, br)
    tp = xp.shape[0]
    progs = resolve_programs(num_programs, tp // br)
    has_res = residual is not None
    args = [xp] + ([pad_axis(residual, 0, br)] if has_res else []) + [w]
    shape = jax.ShapeDtypeStruct((tp, e), x.dtype)
    # One pass when a row block fits in registers (power-of-two E up to 8192), else chunks.
    bc = bc if (bc == e and e <= 8192) else min(bc, 1024)
    outs = pl.pallas_call(
        functools.partial(_rms_kernel, br=br, bc=bc, eps=float(eps), has_res=has_res),
        out_shape=(shape, shape) if has_res else shape,
        grid=(progs,),
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="rms_norm",
    )(*args)
    if has_res:
        return outs[0][:t], outs[1][:t]
    return outs[:t]


def _rope_kernel(x_ref, pos_ref, f_ref, o_ref, *, bt: int, heads: int, half: int) -> None:
    def item(tb):
        rows = pl.ds(tb * bt, bt)
        # cos/sin once per token block, shared by every head (transcendentals are the cost).
        ang = pos_ref[rows].astype(F32)[:, None] * f_ref[...][None, :]
        cos, sin = jnp.cos(ang), jnp.sin(ang)

        def head(hd, carry):
            lo, hi = pl.ds(hd * 2 * half, half), pl.ds(hd * 2 * half + half, half)
            x1 = x_ref[rows, lo].astype(F32)
            x2 = x_ref[rows, hi].astype(F32)
            o_ref[rows, lo] = (x1 * cos - x2 * sin).astype(o_ref.dtype)
            o_ref[rows, hi] = (x2 * cos + x1 * sin).astype(o_ref.dtype)
            return carry

        lax.fori_loop(0, heads, head, jnp.int32(0))

    persistent_loop(x_ref.shape[0] // bt, item)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: dict | None = None,
               num_programs: int | None = None, interpret: bool = False,
               block_tokens: int | None = None, num_warps: int = 4) -> jax.Array:
    """Rotate-half (Hugging Face) RoPE of x [T, heads, D] at positions [T] -> x.dtype.

    `scaling`: None or an HF rope_scaling dict of type llama3 (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). Angles are computed in f32
    in the kernel from the [D/2] inverse frequencies (no cos/sin table in memory).
    Work item = a block of tokens, all heads; block_tokens defaults to the power of two
    that gives each program of the budget about one block (8 to 64 tokens).
    """
    t, heads, d = x.shape
    if block_tokens is None:
        budget = num_programs if num_programs is not None else num_sms()
        block_tokens = max(8, min(64, next_pow2(max(1, t // budget))))
    bt = min(block_tokens, 1 << (t - 1).bit_length()) if t > 0 else 1
    xp = pad_axis(x.reshape(t, heads * d), 0, bt)
    pos = pad_axis(positions.astype(jnp.int32), 0, bt)
    inv = rope_inv_freq(d, theta, scaling)
    progs = resolve_programs(num_programs, xp.shape[0] // bt)
    out = pl.pallas_call(
        functools.partial(_rope_kernel, bt=bt, heads=heads, half=d // 2),
        out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
        grid=(progs,),
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="rope",
    )(xp, pos, inv)
    return out[:t].reshape(t, heads, d)
