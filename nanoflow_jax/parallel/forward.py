"""The pipeline's forward on every device's shard of the model (`jax.shard_map`).

Inside the map each device runs the ordinary forward (`forward_pipeline`: sequential,
nanobatch or nanoflow) on its heads and MLP slice (`TensorParallel.local_config`), with
its part of the KV page pool, so the attention kernels (Pallas or XLA) see local heads
and need no change. The only communication is the all-reduce of the two row-parallel
projections of every layer (`XlaOps.row_parallel_linear`: after `wo` and after
`w_down`); the batch, the embedding and the LM head are replicated, so every device
ends with the same logits.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.nanobatch import NanoPrograms, forward_pipeline
from nanoflow_jax.models.ops import XlaOps, get_ops
from nanoflow_jax.models.paged import BatchInputs, KVCache
from nanoflow_jax.models.params import Params
from nanoflow_jax.parallel.mesh import TP_AXIS
from nanoflow_jax.parallel.sharding import TensorParallel


def sharded_forward(tp: TensorParallel, params: Params, cache: KVCache, batch: BatchInputs, cfg: ModelConfig,
                    kernels: str | XlaOps, pipeline: str,
                    nano_programs: NanoPrograms = ((), ())) -> tuple[jax.Array, KVCache]:
    """`forward_pipeline` over the mesh: params from `tp.shard_params`, cache from
    `tp.allocate_kv_cache`; returns replicated logits [S, V] and the sharded cache."""
    if cfg != tp.cfg:
        raise ValueError("sharded_forward: cfg is not the model this TensorParallel layout was made for")
    ops = dataclasses.replace(get_ops(kernels), tp_axis=TP_AXIS)
    local = tp.local_config

    def body(params: Params, k: jax.Array, v: jax.Array, batch: BatchInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits, out = forward_pipeline(params, KVCache(k=k, v=v), batch, local, ops, pipeline, nano_programs)
        return logits, out.k, out.v

    kv = tp.kv_spec
    # check_vma off: the Pallas kernels' custom calls carry no replication types; the
    # logits are equal on every device because both all-reduces end every layer.
    run = jax.shard_map(body, mesh=tp.mesh, in_specs=(tp.param_specs(params), kv, kv, P()),
                        out_specs=(P(), kv, kv), check_vma=False)
    logits, k, v = run(params, cache.k, cache.v, batch)
    return logits, KVCache(k=k, v=v)
