"""Pure-jnp references for every kernel: the tests' oracle and the model's XLA path.

Shapes and meanings match the Pallas entry points (see their docstrings). All
arithmetic is in f32; results are cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


def gemm(x: jax.Array, w: jax.Array, *, bias: jax.Array | None = None,
         residual: jax.Array | None = None) -> jax.Array:
    """x @ w (+ bias[N]) (+ residual[M, N])."""
    y = jnp.dot(x, w, preferred_element_type=F32)
    if bias is not None:
        y = y + bias.astype(F32)
    if residual is not None:
        y = y + residual.astype(F32)
    return y.astype(x.dtype)


def gemm_silu_mul(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up), the Llama MLP's first half."""
    g = jnp.dot(x, w_gate, preferred_element_type=F32)
    u = jnp.dot(x, w_up, preferred_element_type=F32)
    return (jax.nn.silu(g) * u).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float,
             residual: jax.Array | None = None) -> Any:
    """w * x / rms(x); with `residual`, normalises h = x + residual and returns (y, h)."""
    h = x.astype(F32)
    if residual is not None:
        h = h + residual.astype(F32)
    y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * w.astype(F32)
    if residual is None:
        return y.astype(x.dtype)
    return y.astype(x.dtype), h.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
    """Inverse frequencies [D/2] (f32), with Hugging Face's llama3 scaling when given."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    if not scaling or scaling.get("rope_type", "llama3") != "llama3":
        return inv
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float,
               scaling: dict | None = None) -> jax.Array:
    """Rotate-half RoPE of x [T, heads, D] at positions [T]."""
    d = x.shape[-1]
    ang = positions.astype(F32)[:, None] * rope_inv_freq(d, theta, scaling)[None, :]
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2].astype(F32), x[..., d // 2:].astype(F32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k_new: jax.Array, v_new: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes k_new/v_new [T, K, D] at flat slots of one layer's pages [P, ps, K, D]; an fp8
    (e4m3) cache takes the values saturated at its largest finite value, 448."""
    p, ps = k_pages.shape[:2]
    flat = lambda a: a.reshape(p * ps, *a.shape[2:])

    def stored(x: jax.Array) -> jax.Array:
        if k_pages.dtype == jnp.float8_e4m3fn:
            x = jnp.clip(x.astype(F32), -448.0, 448.0)
        return x.astype(k_pages.dtype)
    k = flat(k_pages).at[slot_mapping].set(stored(k_new))
    v = flat(v_pages).at[slot_mapping].set(stored(v_new))
    return k.reshape(k_pages.shape), v.reshape(v_pages.shape)


def _gather_kv(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """[P, ps, K, D] pages, [S, W] table -> [S, W*ps, K, D] per-request key rows."""
    s, w = block_table.shape
    g = pages[block_table]  # [S, W, ps, K, D]
    return g.reshape(s, w * pages.shape[1], *pages.shape[2:])


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            token_seq: jax.Array, positions: jax.Array,
                            block_table: jax.Array, context_len: jax.Array, *,
                            scale: float) -> jax.Array:
    """Token t attends keys [0, positions[t]] of request token_seq[t] (GQA)."""
    t, h, d = q.shape
    kv_heads = k_pages.shape[2]
    k = _gather_kv(k_pages, block_table)[token_seq].astype(F32)  # [T, L, K, D]
    v = _gather_kv(v_pages, block_table)[token_seq].astype(F32)
    qg = q.astype(F32).reshape(t, kv_heads, h // kv_heads, d)
    s = jnp.einsum("tkgd,tlkd->tkgl", qg, k) * scale
    key_pos = jnp.arange(k.shape[1])
    ok = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] < context_len[token_seq][:, None])
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)
    return jnp.einsum("tkgl,tlkd->tkgd", p, v).reshape(t, h, d).astype(q.dtype)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_table: jax.Array, context_len: jax.Array, *,
                           scale: float) -> jax.Array:
    """One query per row over its context_len keys; rows with context 0 give zeros."""
    n = q.shape[0]
    return paged_prefill_attention(q, k_pages, v_pages, jnp.arange(n), context_len - 1,
                                   block_table, context_len, scale=scale)


def gather_pages(pages: jax.Array, page_ids: jax.Array) -> jax.Array:
    """[L, P, ps, K, D] -> [L, n, ps, K, D] (the pages of one request, contiguous)."""
    return pages[:, page_ids]


def scatter_pages(pages: jax.Array, page_ids: jax.Array, buf: jax.Array) -> jax.Array:
    """Inverse of gather_pages: writes buf [L, n, ps, K, D] into pages at page_ids."""
    return pages.at[:, page_ids].set(buf.astype(pages.dtype))
