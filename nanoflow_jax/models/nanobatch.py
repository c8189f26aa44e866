"""The nano-batch forward: one dense batch as two nano-batches, overlapped on two GPU streams.

The batch's tokens are cut at `split` (the engine cuts after the request rows, so every
decode token is in nano-batch A and B holds prefill tokens only). Each layer first runs
its norm, QKV projection and RoPE over the whole batch (one GEMM) and writes every token's
K/V into the cache in one kernel, so each nano-batch's attention finds its own and the
other's keys in place and the two never write the same buffer at the same time. Then each
nano-batch runs its attention over the paged cache, output projection and MLP as one step.

`overlap=False` is the `nanobatch` pipeline (split, back to back); `overlap=True` the
`nanoflow` pipeline: A's step on GPU stream 1 and B's on stream 2, in one scheduling
group, so A's memory-bound decode attention runs beside B's compute-bound GEMMs. Both
use the same kernels as the sequential `forward_paged`, so the ablation is honest.

A layer's weights reach the steps through the layer scan's own slicing, as in
`forward_paged`: XLA reads a scanned weight in place when the body holds no stream region,
while a weight indexed out of the closed-over stack (`layers[i]`) is copied every layer.
With stream regions in the body (`nanoflow`), XLA copies even the scanned MLP and output
weights of every layer (bench/RESULTS.md, "Pipeline modes"), so there each region takes
the stacked weights whole and the GEMM kernels read layer i of them in place.
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


def _nano_step(ops: XlaOps, sub: BatchInputs, cfg: ModelConfig, k_cache: jax.Array, v_cache: jax.Array,
               layer: jax.Array, stacked: bool) -> Callable[[jax.Array, jax.Array, Params], jax.Array]:
    """One nano-batch's layer `layer` from its rotated q: attention, output projection, MLP.
    The step's weights are the layer's own, or (stacked) every layer's, read at `layer`."""

    def step(x: jax.Array, q: jax.Array, weights: Params) -> jax.Array:
        o = ops.attention(q, k_cache, v_cache, layer, sub, cfg)
        return attention_output_and_mlp(ops, weights, x, o, cfg, layer if stacked else None)
    return step


def forward_nanobatch(params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                      ops: tuple[XlaOps, XlaOps], split: int, overlap: bool) -> tuple[jax.Array, KVCache]:
    """`forward_paged` with tokens [0, split) and [split, T) as two nano-batches.

    ops: the kernel set of each nano-batch (their SM budgets may differ; the whole-batch
    projections and cache write use A's). Returns the same (logits [S, V] float32,
    updated cache) as `forward_paged`."""
    subs = (batch.token_slice(0, split), batch.token_slice(split, batch.num_tokens))
    positions, slots = batch.positions, batch.slot_mapping

    def layer(carry: tuple[jax.Array, jax.Array, jax.Array],
              layer_in: tuple[Params, jax.Array]) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x, k_cache, v_cache = carry
        lp, i = layer_in
        q, k, v = attention_input(ops[0], lp, x, positions, cfg)
        k_cache, v_cache = ops[0].write_kv_rope(k_cache, v_cache, i, k, v, slots, positions, cfg)
        # In stream regions the GEMMs read the stacked weights at layer i (a slice of them
        # would be copied every layer); back to back they take the scan's slice, read in place.
        weights = params["layers"] if overlap else lp
        steps = [_nano_step(o, sub, cfg, k_cache, v_cache, i, stacked=overlap) for o, sub in zip(ops, subs)]
        if overlap:
            steps = [on_stream(s, n + 1) for n, s in enumerate(steps)]
        with stream_group(enabled=overlap):
            xa = steps[0](x[:split], q[:split], weights)
            xb = steps[1](x[split:], q[split:], weights)
        return (jnp.concatenate([xa, xb]), k_cache, v_cache), None

    x = params["embed"][batch.token_ids]
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, k_new, v_new), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (params["layers"], layer_ids))
    return lm_head(params, x[batch.logits_index], cfg), KVCache(k=k_new, v=v_new)


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
