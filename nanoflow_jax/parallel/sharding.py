"""How the parameters and the KV page pool lie over the tensor-parallel mesh (Megatron layout).

- Column-parallel (the output axis split): the Q/K/V projections (separate or fused) and
  the gate/up projections, with their biases. Each device computes its own heads and its
  own slice of the MLP's hidden units, with no communication.
- Row-parallel (the input axis split): the output projection `wo` and `w_down`. Each
  device's product is a partial sum; `XlaOps.row_parallel_linear` all-reduces it.
- Replicated: norms, embedding, LM head.
- The KV page pool [L, P, ps, KV slots, D] is split on its KV-head axis. With
  num_kv_heads % N == 0 each device holds K/N KV heads; otherwise (N % K == 0) each
  device holds the one KV head its query heads read, so a KV head is kept (and computed)
  on every device of its group. The pool's global KV axis therefore has `kv_slots`
  entries, slot s holding KV head `kv_head_map()[s]`.

A fused `wqkv` is re-laid per device as [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so that the
column split hands every device its own Q, K and V columns.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.paged import KVCache
from nanoflow_jax.models.params import Params, param_shapes
from nanoflow_jax.parallel.mesh import TP_AXIS, check_model, make_mesh

COLUMN_PARALLEL = ("wq", "wk", "wv", "wqkv", "bq", "bk", "bv", "bqkv", "w_gate", "w_up")
ROW_PARALLEL = ("wo", "w_down")
KV_COLUMNS = ("wk", "wv", "bk", "bv")


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """One model's layout over an N-device mesh (hashable: a static argument of the step)."""

    cfg: ModelConfig   # the whole model
    mesh: Mesh

    @classmethod
    def create(cls, cfg: ModelConfig, size: int) -> "TensorParallel":
        """Check N against the model, then the devices; the mesh over the first N devices."""
        check_model(size, cfg)
        return cls(cfg=cfg, mesh=make_mesh(size))

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    @property
    def local_kv_heads(self) -> int:
        k = self.cfg.num_kv_heads
        return k // self.size if k % self.size == 0 else 1

    @property
    def kv_slots(self) -> int:
        """KV heads on the pool's global KV axis (K when split, N when kept per group)."""
        return self.size * self.local_kv_heads

    @cached_property
    def local_config(self) -> ModelConfig:
        """The model as one device sees it inside `shard_map`: its heads, its MLP slice."""
        return dataclasses.replace(self.cfg, num_heads=self.cfg.num_heads // self.size,
                                   num_kv_heads=self.local_kv_heads,
                                   intermediate_size=self.cfg.intermediate_size // self.size)

    def kv_head_map(self) -> np.ndarray:
        """The model's KV head held in each slot of the pool's KV axis.

        Device i's query heads start at i * H / N, whose KV head is floor(i * K / N)."""
        slots = np.arange(self.kv_slots)
        device, j = slots // self.local_kv_heads, slots % self.local_kv_heads
        return device * self.cfg.num_kv_heads // self.size + j

    # ---- shardings ------------------------------------------------------------------

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def kv_spec(self) -> P:
        return P(None, None, None, TP_AXIS, None)

    def _spec(self, name: str | None, ndim: int) -> P:
        lead = [None] * (ndim - 1)
        if name in COLUMN_PARALLEL:
            return P(*lead, TP_AXIS)
        if name in ROW_PARALLEL:
            return P(*lead[:-1], TP_AXIS, None)
        return P()

    def param_specs(self, params: Params) -> Any:
        """A PartitionSpec for every leaf of the (re-laid) parameter pytree."""
        return jax.tree_util.tree_map_with_path(lambda path, a: self._spec(getattr(path[-1], "key", None), a.ndim),
                                                params)

    def load_shardings(self) -> Any:
        """Where each parameter of `param_shapes(cfg)` is born, before the re-layout: as
        `param_specs`, except K/V columns, which are split only when the KV heads are."""
        def sharding(path: tuple[Any, ...], shape: tuple[int, ...]) -> NamedSharding:
            name = getattr(path[-1], "key", None)
            split_kv = self.cfg.num_kv_heads % self.size == 0
            spec = P() if name in KV_COLUMNS and not split_kv else self._spec(name, len(shape))
            return NamedSharding(self.mesh, spec)
        return jax.tree_util.tree_map_with_path(sharding, param_shapes(self.cfg),
                                                is_leaf=lambda x: isinstance(x, tuple) and all(
                                                    isinstance(i, int) for i in x))

    # ---- placement ------------------------------------------------------------------

    def _kv_columns(self, a: jax.Array) -> jax.Array:
        """[..., K * D] -> [..., kv_slots * D]: each slot's KV head (repeats when kept per group)."""
        d = self.cfg.head_dim
        heads = a.reshape(*a.shape[:-1], self.cfg.num_kv_heads, d)
        return heads[..., self.kv_head_map(), :].reshape(*a.shape[:-1], self.kv_slots * d)

    def _fused_qkv(self, a: jax.Array) -> jax.Array:
        """[..., q + 2 kv] -> per device its Q columns, then its K and V slots' columns, device after device."""
        q_size, kv_size = self.cfg.q_size, self.cfg.kv_size
        q, k, v = a[..., :q_size], a[..., q_size:q_size + kv_size], a[..., q_size + kv_size:]
        parts = [x.reshape(*a.shape[:-1], self.size, -1) for x in (q, self._kv_columns(k), self._kv_columns(v))]
        out = jnp.concatenate(parts, axis=-1)
        return out.reshape(*a.shape[:-1], -1)

    def _place(self, fn: Callable[..., jax.Array], name: str, *arrays: jax.Array) -> jax.Array:
        """fn(*arrays) computed inside jit straight into leaf `name`'s sharding."""
        target = NamedSharding(self.mesh, self._spec(name, arrays[0].ndim))
        return jax.jit(fn, out_shardings=target)(*arrays)

    def shard_params(self, params: Params, fuse_qkv: bool = False) -> Params:
        """The parameters re-laid (K/V columns per slot; Q, K, V fused per device when
        `fuse_qkv` or already fused) and placed on the mesh, each leaf split by
        `param_specs`. Leaf by leaf, inside jit, so a model born split (`load_shardings`)
        is never gathered onto one device."""
        layers = dict(params["layers"])
        fused = {}
        for fused_name, names in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            if fuse_qkv and names[0] in layers:
                parts = [layers.pop(n) for n in names]
                fused[fused_name] = self._place(lambda *p: self._fused_qkv(jnp.concatenate(p, axis=-1)),
                                                fused_name, *parts)
        relayouts = {"wk": self._kv_columns, "wv": self._kv_columns, "bk": self._kv_columns,
                     "bv": self._kv_columns, "wqkv": self._fused_qkv, "bqkv": self._fused_qkv}

        def place(path: tuple[Any, ...], a: jax.Array) -> jax.Array:
            name = getattr(path[-1], "key", None)
            if name not in relayouts:   # no copy when already where it belongs
                return jax.device_put(a, NamedSharding(self.mesh, self._spec(name, a.ndim)))
            return self._place(relayouts[name], name, a)
        placed = jax.tree_util.tree_map_with_path(place, {**params, "layers": layers})
        return {**placed, "layers": {**placed["layers"], **fused}}

    def cache_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        cfg = self.cfg
        return (cfg.num_layers, num_pages, page_size, self.kv_slots, cfg.head_dim)

    def cache_struct(self, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
        """The pool's abstract shape and sharding (to lower the step without allocating it)."""
        s = jax.ShapeDtypeStruct(self.cache_shape(num_pages, page_size), dtype,
                                 sharding=NamedSharding(self.mesh, self.kv_spec))
        return KVCache(k=s, v=s)

    def allocate_kv_cache(self, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
        """A zeroed pool, each device's KV heads born on that device."""
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
        shape, sharding = self.cache_shape(num_pages, page_size), NamedSharding(self.mesh, self.kv_spec)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return KVCache(k=zeros(), v=zeros())
