"""The nano-batch forward: one dense batch as two nano-batches, overlapped on two GPU streams.

The batch's tokens are cut at `split` (the engine cuts after the request rows, so every
decode token is in nano-batch A and B holds prefill tokens only). Each layer runs as one
step per nano-batch: attention over the paged cache, output projection, MLP, then the
next layer's norm, QKV projection and RoPE. Between layers, on the main stream, the next
layer's K/V of every token are written into the cache in one kernel, so each nano-batch's
attention finds its own and the other's keys in place and the two never write the same
buffer at the same time.

`overlap=False` is the `nanobatch` pipeline (split, back to back); `overlap=True` the
`nanoflow` pipeline: A's step on GPU stream 1 and B's on stream 2, in one scheduling
group, so A's memory-bound decode attention runs beside B's compute-bound GEMMs. Both
use the same kernels as the sequential `forward_paged`, so the ablation is honest.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from nanoflow_jax.config import PIPELINES, ModelConfig
from nanoflow_jax.models.llama import attention_input, attention_output_and_mlp, forward_paged, lm_head
from nanoflow_jax.models.ops import XlaOps, get_ops, with_programs
from nanoflow_jax.models.paged import BatchInputs, KVCache
from nanoflow_jax.models.params import Params
from nanoflow_jax.models.streams import on_stream, stream_group

Projections = tuple[jax.Array, jax.Array, jax.Array]  # q (rotated), k, v of one layer


def _layer_at(layers: Params, i: jax.Array | int) -> Params:
    return jax.tree_util.tree_map(lambda a: a[i], layers)


def _nano_step(ops: XlaOps, sub: BatchInputs, cfg: ModelConfig, lp: Params, nxt: Params | None,
               k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array
               ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, Projections | None]]:
    """One nano-batch's layer `layer` from its rotated q, then layer `nxt`'s projections."""

    def step(x: jax.Array, q: jax.Array) -> tuple[jax.Array, Projections | None]:
        o = ops.attention(q, k_cache, v_cache, layer, sub, cfg)
        x = attention_output_and_mlp(ops, lp, x, o, cfg)
        return x, None if nxt is None else attention_input(ops, nxt, x, sub.positions, cfg)
    return step


def forward_nanobatch(params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                      ops: tuple[XlaOps, XlaOps], split: int, overlap: bool) -> tuple[jax.Array, KVCache]:
    """`forward_paged` with tokens [0, split) and [split, T) as two nano-batches.

    ops: the kernel set of each nano-batch (their SM budgets may differ). Returns the same
    (logits [S, V] float32, updated cache) as `forward_paged`."""
    subs = (batch.token_slice(0, split), batch.token_slice(split, batch.num_tokens))
    layers, num_layers = params["layers"], cfg.num_layers
    positions, slots = batch.positions, batch.slot_mapping

    def write(k_cache, v_cache, layer, proj_a, proj_b):
        """Both nano-batches' K/V of `layer`, in token order, in one cache write."""
        k = jnp.concatenate([proj_a[1], proj_b[1]])
        v = jnp.concatenate([proj_a[2], proj_b[2]])
        return ops[0].write_kv_rope(k_cache, v_cache, layer, k, v, slots, positions, cfg)

    def both(carry, lp, nxt, layer):
        """Both nano-batches' layer `layer` (each on its stream when overlapping)."""
        xa, xb, qa, qb, k_cache, v_cache = carry
        steps = [_nano_step(o, sub, cfg, lp, nxt, k_cache, v_cache, layer) for o, sub in zip(ops, subs)]
        if overlap:
            steps = [on_stream(s, i + 1) for i, s in enumerate(steps)]
        with stream_group(enabled=overlap):
            xa, proj_a = steps[0](xa, qa)
            xb, proj_b = steps[1](xb, qb)
        return xa, xb, proj_a, proj_b

    x = params["embed"][batch.token_ids]
    q, k, v = attention_input(ops[0], _layer_at(layers, 0), x, positions, cfg)
    k_cache, v_cache = ops[0].write_kv_rope(cache.k, cache.v, jnp.int32(0), k, v, slots, positions, cfg)
    carry = (x[:split], x[split:], q[:split], q[split:], k_cache, v_cache)

    def layer(carry, i):
        xa, xb, pa, pb = both(carry, _layer_at(layers, i), _layer_at(layers, i + 1), i)
        k_cache, v_cache = write(carry[4], carry[5], i + 1, pa, pb)
        return (xa, xb, pa[0], pb[0], k_cache, v_cache), None

    # Layers 0 .. L-2 each end with the next layer's projections; the last has none.
    carry, _ = jax.lax.scan(layer, carry, jnp.arange(num_layers - 1, dtype=jnp.int32))
    last = jnp.int32(num_layers - 1)
    xa, xb, _, _ = both(carry, _layer_at(layers, last), None, last)
    x = jnp.concatenate([xa, xb])
    return lm_head(params, x[batch.logits_index], cfg), KVCache(k=carry[4], v=carry[5])


def nano_split(batch_tokens: int, batch_rows: int) -> int | None:
    """Where the engine cuts a batch: after its request rows (all decodes fall in A), or
    None when nothing is left for B (batches of at most max_num_seqs tokens)."""
    return batch_rows if batch_tokens > batch_rows else None


NanoPrograms = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def forward_pipeline(params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                     kernels: str | XlaOps, pipeline: str,
                     nano_programs: NanoPrograms = ((), ())) -> tuple[jax.Array, KVCache]:
    """One iteration's forward in a pipeline mode (config.PIPELINES). A batch with no token
    after its request rows has nothing to split and runs sequentially in every mode.
    nano_programs: SM budgets by op for nano-batch A and B (ops.programs_key; empty: the
    kernel set's own)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    split = None if pipeline == "sequential" else nano_split(batch.num_tokens, batch.num_seqs)
    if split is None:
        return forward_paged(params, cache, batch, cfg, kernels)
    ops = get_ops(kernels)
    nano_ops = tuple(with_programs(ops, p) if p else ops for p in nano_programs)
    return forward_nanobatch(params, cache, batch, cfg, nano_ops, split, overlap=pipeline == "nanoflow")
