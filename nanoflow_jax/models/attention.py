"""Attention backends: dense causal (no cache) and paged (XLA gather, or Pallas kernels).

GQA throughout: H query heads share K KV heads, G = H // K query heads per KV head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.paged import BatchInputs

def _grouped_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [..., Tq, H, D]; k, v [..., Tk, K, D]; mask broadcastable to [..., Tq, Tk] -> [..., Tq, H, D]."""
    *lead, tq, h, d = q.shape
    kv_heads = k.shape[-2]
    qg = q.reshape(*lead, tq, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("...qkgd,...tkd->...kgqt", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[..., None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with no visible key (padding) produce NaN from softmax; zero them.
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)
    out = jnp.einsum("...kgqt,...tkd->...qkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(*lead, tq, h, d).astype(q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Dense causal attention over whole sequences: q [B, T, H, D], k/v [B, T, K, D]."""
    t = q.shape[-3]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    return _grouped_softmax_attention(q, k, v, mask)


def paged_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                        batch: BatchInputs, cfg: ModelConfig) -> jax.Array:
    """Reference paged attention: every token gathers its request's pages.

    Costs T x W x page_size gathered keys: exact and simple, meant for the CPU and for
    checking the Pallas kernels, not for long contexts on a GPU.
    """
    tables = batch.block_table[batch.token_seq]            # [T, W]
    t, w = tables.shape
    ps = k_pages.shape[1]
    # In q's dtype: an fp8 cache is widened as it is read, as the kernels do.
    keys = k_pages[tables].reshape(t, w * ps, *k_pages.shape[2:]).astype(q.dtype)   # [T, W*ps, K, D]
    vals = v_pages[tables].reshape(t, w * ps, *v_pages.shape[2:]).astype(q.dtype)
    key_pos = jnp.arange(w * ps)
    mask = key_pos[None, :] <= batch.positions[:, None]    # [T, W*ps]
    # Slots a token may not see can hold anything (a freed page's old K/V, NaN included):
    # its zero probability times NaN would still be NaN, so they are zeroed first.
    vals = jnp.where(mask[:, :, None, None], vals, jnp.zeros((), vals.dtype))
    out = _grouped_softmax_attention(q[:, None], keys, vals, mask[:, None, :])
    return out[:, 0]
