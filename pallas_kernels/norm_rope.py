"""RMSNorm (optionally fused with the residual add) and RoPE, persistent Triton kernels.

Both are memory-bound streams, so the knobs decide how many bytes each program has in
flight. RMSNorm: a work item is a block of `block_rows` rows. When the block fits the
register budget (power-of-two hidden size, <= _ONE_PASS_PER_THREAD f32 values a thread)
it is read once and written once; otherwise the hidden dim goes in power-of-two chunks
(Triton tiles are powers of two, hidden sizes such as 576 are not) in two passes, sum of
squares then scale, the second re-reading the block from L2. RoPE: a work item is a
block of tokens times a group of heads; each loop step rotates `heads_per_step` heads
whose loads are independent, so they are in flight together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (cdiv, next_pow2, num_sms, pad_axis, persistent_loop, pick_block,
                                     resolve_programs, triton_params)
from pallas_kernels.reference import rope_inv_freq

F32 = jnp.float32
_CHUNKS = (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
_ONE_PASS_PER_THREAD = 64  # f32 values of a row block a thread may hold without spilling
_ITEM_BYTES = 64 << 10  # default RMSNorm item: >= 64 KB read, enough in flight per program
_ROPE_STEP_ELEMS = 16384  # default RoPE step: at most this many elements loaded at once
# From this many tokens a program, RoPE takes bigger token blocks, 4 heads a step on 8
# warps: more bytes in flight per program, which long batches need to approach the copy
# bandwidth (bench/RESULTS.md, RMSNorm and RoPE).
_ROPE_LONG_TOKENS = 32


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, max(1, min(n, at_most)) + 1) if n % k == 0)


def _rms_kernel(*refs, br: int, bc: int, eps: float, has_res: bool) -> None:
    if has_res:
        x_ref, r_ref, w_ref, y_ref, h_ref = refs
    else:
        (x_ref, w_ref, y_ref), r_ref, h_ref = refs, None, None
    e = x_ref.shape[1]
    chunks = e // bc
    # One pass loads the weight once per program, not once per item.
    w_row = w_ref[...].astype(F32) if chunks == 1 else None

    def one_pass(b):
        # The whole row block fits in registers: read once, write once.
        rows = pl.ds(b * br, br)
        h = x_ref[rows, :].astype(F32)
        if has_res:
            h = h + r_ref[rows, :].astype(F32)
            h_ref[rows, :] = h.astype(h_ref.dtype)
            h = h.astype(h_ref.dtype).astype(F32)  # normalise the rounded sum, like the model
        inv = lax.rsqrt(jnp.sum(h * h, axis=1) / e + eps)
        y_ref[rows, :] = (h * inv[:, None] * w_row[None, :]).astype(y_ref.dtype)

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


def default_block_rows(t: int, e: int, itemsize: int, has_res: bool, programs: int) -> int:
    """Fewest rows (power of two <= 16) reading >= _ITEM_BYTES, halved while some program would idle."""
    row_bytes = e * itemsize * (2 if has_res else 1)
    br = min(16, next_pow2(cdiv(_ITEM_BYTES, row_bytes)))
    while br > 1 and cdiv(t, br) < programs:
        br //= 2
    return br


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, residual: jax.Array | None = None,
             num_programs: int | None = None, interpret: bool = False, block_rows: int | None = None,
             num_warps: int = 8, block_cols: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """RMSNorm of x [T, E] with weight w [E] -> y [T, E] in x.dtype.

    With `residual` [T, E]: h = x + residual is normalised and (y, h) is returned
    (h is the new residual stream), in one pass over memory.
    block_rows: rows per work item (None: default_block_rows; 2 was the old default).
    block_cols: columns per chunk of the two-pass path (None: the whole row in one pass
    when it fits the registers of `num_warps` warps; 1024 forces the old chunked path).
    """
    t, e = x.shape
    has_res = residual is not None
    budget = num_programs if num_programs is not None else num_sms()
    if block_rows is None:
        block_rows = default_block_rows(t, e, x.dtype.itemsize, has_res, budget)
    br = min(block_rows, next_pow2(t)) if t > 0 else 1
    regs = _ONE_PASS_PER_THREAD * 32 * num_warps
    if block_cols is None and e & (e - 1) == 0 and br * e <= regs:
        bc = e
    else:
        cap = max(1, block_cols if block_cols is not None else min(1024, regs // br))
        bc = pick_block(e, tuple(c for c in _CHUNKS if c <= cap))
    xp = pad_axis(x, 0, br)
    tp = xp.shape[0]
    progs = resolve_programs(num_programs, tp // br)
    args = [xp] + ([pad_axis(residual, 0, br)] if has_res else []) + [w]
    shape = jax.ShapeDtypeStruct((tp, e), x.dtype)
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


def rope_cos_sin(pos: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [rows, D/2] in f32 of positions [rows] (in-kernel; shared by the heads)."""
    ang = pos.astype(F32)[:, None] * inv_freq[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def rotate_half(x1: jax.Array, x2: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of a head's two halves (f32): the new first and second halves."""
    x1, x2 = x1.astype(F32), x2.astype(F32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _rope_kernel(x_ref, pos_ref, f_ref, o_ref, *, bt: int, hps: int, steps: int, splits: int,
                 half: int) -> None:
    d = 2 * half

    def item(i):
        tb, group = i // splits, i % splits
        rows = pl.ds(tb * bt, bt)
        # cos/sin once per item, shared by its heads (transcendentals are the cost).
        cos, sin = rope_cos_sin(pos_ref[rows], f_ref[...])

        def step(s, carry):
            h0 = (group * steps + s) * hps
            cols = [(pl.ds((h0 + j) * d, half), pl.ds((h0 + j) * d + half, half)) for j in range(hps)]
            # Every load of the step before any store: independent, so all in flight together.
            xs = [(x_ref[rows, lo], x_ref[rows, hi]) for lo, hi in cols]
            for (lo, hi), (x1, x2) in zip(cols, xs):
                y1, y2 = rotate_half(x1, x2, cos, sin)
                o_ref[rows, lo] = y1.astype(o_ref.dtype)
                o_ref[rows, hi] = y2.astype(o_ref.dtype)
            return carry

        lax.fori_loop(0, steps, step, jnp.int32(0))

    persistent_loop(x_ref.shape[0] // bt * splits, item)


def rope_defaults(t: int, budget: int) -> tuple[int | None, int, int]:
    """(block_tokens, heads_per_step, num_warps) apply_rope uses for T tokens on `budget`
    programs (block_tokens None: rope_blocks' own choice)."""
    per_program = t // max(1, budget)
    if per_program >= _ROPE_LONG_TOKENS:
        return min(64, next_pow2(per_program + 1) // 2), 4, 8  # the power of two <= per_program
    return None, 8, 4


def rope_blocks(t: int, heads: int, d: int, budget: int, block_tokens: int | None = None,
                heads_per_step: int = 8, head_splits: int | None = None) -> tuple[int, int, int]:
    """(block_tokens, heads_per_step, head_splits) that apply_rope launches with.

    heads_per_step and head_splits round down to divisors (of heads, of the head groups).
    Default block_tokens: the power of two giving each program about one block (8 to 64
    tokens), halved while a step would load more than _ROPE_STEP_ELEMS elements.
    Default head_splits: the fewest that give every program of the budget an item.
    """
    hps = _largest_divisor(heads, heads_per_step)
    if block_tokens is None:
        block_tokens = max(8, min(64, next_pow2(max(1, t // budget))))
        while block_tokens > 8 and block_tokens * hps * d > _ROPE_STEP_ELEMS:
            block_tokens //= 2
    bt = min(block_tokens, next_pow2(t)) if t > 0 else 1
    groups = heads // hps
    if head_splits is None:
        blocks = cdiv(t, bt)
        head_splits = next((s for s in range(1, groups + 1) if groups % s == 0 and blocks * s >= budget), groups)
    return bt, hps, _largest_divisor(groups, head_splits)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: dict | None = None,
               num_programs: int | None = None, interpret: bool = False,
               block_tokens: int | None = None, num_warps: int | None = None,
               heads_per_step: int | None = None, head_splits: int | None = None) -> jax.Array:
    """Rotate-half (Hugging Face) RoPE of x [T, heads, D] at positions [T] -> x.dtype.

    `scaling`: None or an HF rope_scaling dict of type llama3 (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). Angles are computed in f32
    in the kernel from the [D/2] inverse frequencies (no cos/sin table in memory).
    Work item = a block of tokens x 1/head_splits of the heads, rotated heads_per_step
    heads a loop step (see rope_blocks; heads_per_step=1, head_splits=1 was the old kernel).
    Knobs left None take rope_defaults' values.
    """
    t, heads, d = x.shape
    budget = num_programs if num_programs is not None else num_sms()
    d_bt, d_hps, d_nw = rope_defaults(t, budget)
    block_tokens = block_tokens if block_tokens is not None else d_bt
    heads_per_step = heads_per_step if heads_per_step is not None else d_hps
    num_warps = num_warps if num_warps is not None else d_nw
    bt, hps, splits = rope_blocks(t, heads, d, budget, block_tokens, heads_per_step, head_splits)
    xp = pad_axis(x.reshape(t, heads * d), 0, bt)
    pos = pad_axis(positions.astype(jnp.int32), 0, bt)
    inv = rope_inv_freq(d, theta, scaling)
    progs = resolve_programs(num_programs, xp.shape[0] // bt * splits)
    out = pl.pallas_call(
        functools.partial(_rope_kernel, bt=bt, hps=hps, steps=heads // hps // splits, splits=splits,
                          half=d // 2),
        out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
        grid=(progs,),
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="rope",
    )(xp, pos, inv)
    return out[:t].reshape(t, heads, d)
