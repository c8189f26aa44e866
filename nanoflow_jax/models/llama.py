"""Llama-family forward passes as pure functions over the parameter pytree.

`forward_dense` runs whole sequences without a cache (reference, training, Flax).
`forward_paged` runs one dense batch of mixed prefill chunks and decodes over the paged
KV cache (the serving path). Both share the same layer pieces so they cannot drift.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import ModelConfig, RopeScaling
from nanoflow_jax.models import attention
from nanoflow_jax.models.paged import BatchInputs, KVCache
from nanoflow_jax.models.params import Params

KERNEL_BACKENDS = ("xla", "pallas")


# ---- layer pieces -----------------------------------------------------------------

def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies, with Llama 3.1's piecewise rescaling when configured."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    mid = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / scaling.factor, np.where(wavelen < high_wavelen, inv, mid))
    return out.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate-half RoPE. x: [..., T, heads, D], positions: [..., T]."""
    inv = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [..., T, D/2]
    cos = jnp.cos(ang)[..., None, :]
    sin = jnp.sin(ang)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def qkv_projection(lp: Params, h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h: [..., E] (already normed) -> q [..., H, D], k/v [..., K, D] (no RoPE yet)."""
    q, k, v = _dot(h, lp["wq"]), _dot(h, lp["wk"]), _dot(h, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
    lead = h.shape[:-1]
    return (q.reshape(*lead, cfg.num_heads, cfg.head_dim),
            k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim))


def mlp(lp: Params, h: jax.Array) -> jax.Array:
    gate = _dot(h, lp["w_gate"]).astype(jnp.float32)
    up = _dot(h, lp["w_up"]).astype(jnp.float32)
    return _dot((jax.nn.silu(gate) * up).astype(h.dtype), lp["w_down"])


def lm_head(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def _block(lp: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
           attend: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """One decoder block; `attend(q, k, v)` returns the attention output and any new state."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv_projection(lp, h, cfg)
    q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    o, state = attend(q, k, v)
    x = x + _dot(o.reshape(*o.shape[:-2], cfg.q_size), lp["wo"])
    x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
    return x, state


# ---- whole-sequence forward (no cache) --------------------------------------------

@partial(jax.jit, static_argnames=("cfg",))
def forward_dense(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] (float32), causal, positions 0..T-1."""
    x = params["embed"][tokens]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def layer(x: jax.Array, lp: Params) -> tuple[jax.Array, None]:
        x, _ = _block(lp, x, positions, cfg, lambda q, k, v: (attention.causal_attention(q, k, v), None))
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return lm_head(params, x, cfg)


# ---- paged forward (serving) --------------------------------------------------------

def forward_paged(params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                  kernels: str = "xla") -> tuple[jax.Array, KVCache]:
    """One dense batch over the paged cache -> (logits [S, V] float32, updated cache).

    Each layer first writes the batch's new K/V into their pages, then every token
    attends over positions [0, position] of its own request, so a prefill chunk is
    causal inside itself and sees its whole cached prefix.
    """
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {kernels!r}")
    attn = attention.paged_attention_backend(kernels)
    x = params["embed"][batch.token_ids]

    def layer(x: jax.Array, layer_in: tuple[Params, jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        lp, k_pages, v_pages = layer_in

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            k_pages2, v_pages2 = attention.write_kv(k_pages, v_pages, k, v, batch.slot_mapping)
            return attn(q, k_pages2, v_pages2, batch, cfg), (k_pages2, v_pages2)

        return _block(lp, x, batch.positions, cfg, attend)

    x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], cache.k, cache.v))
    logits = lm_head(params, x[batch.logits_index], cfg)
    return logits, KVCache(k=k_new, v=v_new)
