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

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models import attention
from nanoflow_jax.models.ops import Layer, XlaOps, at_layer, get_ops, rms_norm
from nanoflow_jax.models.paged import BatchInputs, KVCache
from nanoflow_jax.models.params import Params

# ---- layer pieces -----------------------------------------------------------------

def qkv_projection(ops: XlaOps, lp: Params, h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h: [..., E] (already normed) -> q [..., H, D], k/v [..., K, D] (no RoPE yet).

    Takes the separate projections, or the fused `wqkv` of params.fuse_qkv (one GEMM)."""
    if "wqkv" in lp:
        qkv = ops.linear(h, lp["wqkv"], lp.get("bqkv"))
        q, k, v = jnp.split(qkv, (cfg.q_size, cfg.q_size + cfg.kv_size), axis=-1)
    else:
        bias = cfg.attention_bias
        q = ops.linear(h, lp["wq"], lp["bq"] if bias else None)
        k = ops.linear(h, lp["wk"], lp["bk"] if bias else None)
        v = ops.linear(h, lp["wv"], lp["bv"] if bias else None)
    lead = h.shape[:-1]
    return (q.reshape(*lead, cfg.num_heads, cfg.head_dim),
            k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim))


def lm_head(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def attention_input(ops: XlaOps, lp: Params, x: jax.Array, positions: jax.Array,
                    cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's work before attention: norm, QKV projection, RoPE on q -> (q, k, v).
    K is handed over un-rotated: its only reader is the cache, whose write may rotate it."""
    h = ops.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv_projection(ops, lp, h, cfg)
    return ops.rope(q, positions, cfg), k, v


def attention_output_and_mlp(ops: XlaOps, lp: Params, x: jax.Array, o: jax.Array, cfg: ModelConfig,
                             layer: Layer = None) -> jax.Array:
    """A layer's work after attention: output projection onto the residual, then the MLP.
    Both are row-parallel under tensor parallelism (an all-reduce each: ops.tp_axis).
    lp: one layer's weights, or with `layer` given the stacked weights of every layer,
    which the GEMMs then read at that layer in place."""
    x = ops.row_parallel_linear(o.reshape(*o.shape[:-2], cfg.q_size), lp["wo"], x, layer)
    h = ops.rms_norm(x, at_layer(lp["mlp_norm"], layer), cfg.rms_norm_eps)
    return ops.row_parallel_linear(ops.gate_up(h, lp["w_gate"], lp["w_up"], layer), lp["w_down"], x, layer)


def _block(ops: XlaOps, lp: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
           attend: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """One decoder block; `attend(q, k, v)` returns the attention output and any new state.
    q arrives rotated (RoPE), k not: attend rotates it (the paged path in its cache write)."""
    q, k, v = attention_input(ops, lp, x, positions, cfg)
    o, state = attend(q, k, v)
    return attention_output_and_mlp(ops, lp, x, o, cfg), state


# ---- whole-sequence forward (no cache) --------------------------------------------

@partial(jax.jit, static_argnames=("cfg",))
def forward_dense(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] (float32), causal, positions 0..T-1."""
    x = params["embed"][tokens]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ops = XlaOps()  # the training path: plain XLA ops, differentiable

    def layer(x: jax.Array, lp: Params) -> tuple[jax.Array, None]:
        x, _ = _block(ops, lp, x, positions, cfg,
                      lambda q, k, v: (attention.causal_attention(q, ops.rope(k, positions, cfg), v), None))
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return lm_head(params, x, cfg)


# ---- paged forward (serving) --------------------------------------------------------

def forward_paged(params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                  kernels: str | XlaOps = "xla") -> tuple[jax.Array, KVCache]:
    """One dense batch over the paged cache -> (logits [S, V] float32, updated cache).

    Each layer first writes the batch's new K/V into their pages, then every token
    attends over positions [0, position] of its own request, so a prefill chunk is
    causal inside itself and sees its whole cached prefix. The cache rides through the
    layer scan as a carry so every write is in place (donate it to the jitted caller).
    """
    ops = get_ops(kernels)
    x = params["embed"][batch.token_ids]

    def layer(carry: tuple[jax.Array, jax.Array, jax.Array],
              layer_in: tuple[Params, jax.Array]) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x, k_cache, v_cache = carry
        lp, i = layer_in

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            kc, vc = ops.write_kv_rope(k_cache, v_cache, i, k, v, batch.slot_mapping, batch.positions, cfg)
            return ops.attention(q, kc, vc, i, batch, cfg), (kc, vc)

        x, (k_cache, v_cache) = _block(ops, lp, x, batch.positions, cfg, attend)
        return (x, k_cache, v_cache), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, k_new, v_new), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (params["layers"], layer_ids))
    logits = lm_head(params, x[batch.logits_index], cfg)
    return logits, KVCache(k=k_new, v=v_new)
