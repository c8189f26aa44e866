"""Kernel sets for the serving forward: the same layer code runs on XLA ops or Pallas kernels.

`XlaOps` is plain jnp (the CPU default and the reference); `PallasOps` calls
`pallas_kernels`, each op with its own SM budget (`num_programs`), which is what the
nano-batch pipeline tunes. The KV cache is always passed whole ([L, P, ps, K, D]) with
a layer index, so no per-layer copy of the cache is ever made.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import KERNEL_SETS, ModelConfig, RopeScaling
from nanoflow_jax.models import attention
from nanoflow_jax.models.paged import BatchInputs
from pallas_kernels.kv_pages import to_cache_dtype


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


Layer = jax.Array | int | None  # an index into stacked [L, ...] weights, or None: w is one layer's


def at_layer(w: jax.Array, layer: Layer) -> jax.Array:
    """w itself, or with `layer` given, that layer of the stacked [L, ...] weights."""
    return w if layer is None else jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class XlaOps:
    name = "xla"
    # The mesh axis that row-parallel projections sum over (tensor parallelism, inside
    # `shard_map`: parallel/forward.py); None: this device holds whole matrices.
    tp_axis: str | None = None

    def row_parallel_linear(self, x: jax.Array, w: jax.Array, residual: jax.Array,
                            layer: Layer = None) -> jax.Array:
        """residual + x @ w, where under tensor parallelism x's last axis and w's rows are
        this device's shard: the partial products are all-reduced before the residual is
        added (once, not once per device)."""
        if self.tp_axis is None:
            return self.linear(x, w, residual=residual, layer=layer)
        y = jax.lax.psum(self.linear(x, w, layer=layer), self.tp_axis)
        return (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)

    def linear(self, x: jax.Array, w: jax.Array, bias: jax.Array | None = None,
               residual: jax.Array | None = None, layer: Layer = None) -> jax.Array:
        """x @ w (+ bias) (+ residual). layer: w is the stacked [L, K, N] weights and this
        index picks one (the GEMM kernels read it in place: models/nanobatch.py says why)."""
        y = _dot(x, at_layer(w, layer))
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        if residual is not None:
            y = y + residual.astype(jnp.float32)
        return y.astype(x.dtype)

    def gate_up(self, x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: Layer = None) -> jax.Array:
        return (jax.nn.silu(_dot(x, at_layer(w_gate, layer))) * _dot(x, at_layer(w_up, layer))).astype(x.dtype)

    def rms_norm(self, x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
        return rms_norm(x, w, eps)

    def rope(self, x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
        return apply_rope(x, positions, cfg)

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, k: jax.Array,
                 v: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        ps = k_cache.shape[2]
        page, off = slots // ps, slots % ps
        return (k_cache.at[layer, page, off].set(to_cache_dtype(k, k_cache.dtype)),
                v_cache.at[layer, page, off].set(to_cache_dtype(v, v_cache.dtype)))

    def write_kv_rope(self, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, k: jax.Array,
                      v: jax.Array, slots: jax.Array, positions: jax.Array,
                      cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
        """write_kv of RoPE(k) and v: the cache is K's only reader, so its rotation can
        ride on the write (PallasOps.fuse_rope_kv)."""
        return self.write_kv(k_cache, v_cache, layer, self.rope(k, positions, cfg), v, slots)

    def attention(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                  batch: BatchInputs, cfg: ModelConfig) -> jax.Array:
        return attention.paged_attention_xla(q, k_cache[layer], v_cache[layer], batch, cfg)


def _scaling_dict(cfg: ModelConfig) -> dict | None:
    """The RoPE scaling as the kernels take it (Hugging Face's rope_scaling dict)."""
    return None if cfg.rope_scaling is None else dataclasses.asdict(cfg.rope_scaling)


@dataclasses.dataclass(frozen=True)
class PallasOps(XlaOps):
    """Pallas kernels; `programs` maps op name -> SM budget (missing: the whole GPU).

    xla_gemm: the projections go to XLA's dot (cuBLAS) whenever no GEMM budget is set,
    the "hybrid" kernel set: the ablation of our GEMMs against the library's.
    """

    name = "pallas"
    programs: tuple[tuple[str, int], ...] = ()
    xla_gemm: bool = False
    fuse_rope_kv: bool = False  # K's RoPE inside the cache write (one kernel, not two)

    def _library_gemm(self) -> bool:
        return self.xla_gemm and self._np("gemm") is None

    @property
    def _interpret(self) -> bool:
        return jax.default_backend() == "cpu"

    def _np(self, op: str) -> int | None:
        return dict(self.programs).get(op)

    def linear(self, x, w, bias=None, residual=None, layer=None):
        import pallas_kernels as pk

        if self._library_gemm():
            return super().linear(x, w, bias, residual, layer)
        return pk.gemm(x, w, bias=bias, residual=residual, num_programs=self._np("gemm"),
                       interpret=self._interpret, layer=layer)

    def gate_up(self, x, w_gate, w_up, layer=None):
        import pallas_kernels as pk

        if self._library_gemm():
            return super().gate_up(x, w_gate, w_up, layer)
        return pk.gemm_silu_mul(x, w_gate, w_up, num_programs=self._np("gemm"), interpret=self._interpret,
                                layer=layer)

    def rms_norm(self, x, w, eps):
        import pallas_kernels as pk

        return pk.rms_norm(x, w, eps=eps, num_programs=self._np("norm"), interpret=self._interpret)

    def rope(self, x, positions, cfg):
        import pallas_kernels as pk

        return pk.apply_rope(x, positions, theta=cfg.rope_theta, scaling=_scaling_dict(cfg),
                             num_programs=self._np("rope"), interpret=self._interpret)

    def write_kv(self, k_cache, v_cache, layer, k, v, slots):
        import pallas_kernels as pk

        return pk.write_kv(k_cache, v_cache, k, v, slots, layer=layer, num_programs=self._np("write_kv"),
                           interpret=self._interpret)

    def write_kv_rope(self, k_cache, v_cache, layer, k, v, slots, positions, cfg):
        import pallas_kernels as pk

        if not self.fuse_rope_kv:
            return super().write_kv_rope(k_cache, v_cache, layer, k, v, slots, positions, cfg)
        return pk.write_kv(k_cache, v_cache, k, v, slots, layer=layer, rope_positions=positions,
                           rope_theta=cfg.rope_theta, rope_scaling=_scaling_dict(cfg),
                           num_programs=self._np("write_kv"), interpret=self._interpret)

    def attention(self, q, k_cache, v_cache, layer, batch, cfg):
        """Decode rows on the decode kernel, prefill chunks on the prefill kernel (not
        launched for a `decode_only` batch)."""
        import pallas_kernels as pk

        # The kernels see all layers as one pool of L * P pages and this layer's requests
        # through shifted block tables: slicing k_cache[layer] would copy a whole layer of
        # the cache (a custom call needs its operand materialized) at every layer of every step.
        num_layers, num_pages = k_cache.shape[:2]
        k_all = k_cache.reshape(num_layers * num_pages, *k_cache.shape[2:])
        v_all = v_cache.reshape(num_layers * num_pages, *v_cache.shape[2:])
        tables = batch.block_table + layer * num_pages
        t, s = q.shape[0], batch.num_seqs
        scale = cfg.head_dim ** -0.5
        prefill = functools.partial(pk.paged_prefill_attention, k_pages=k_all, v_pages=v_all,
                                    token_seq=batch.token_seq, block_table=tables, context_len=batch.context_len,
                                    scale=scale, num_programs=self._np("prefill_attention"),
                                    interpret=self._interpret)
        if batch.prefill_only:  # no decode token: the decode kernel is skipped
            return prefill(q, positions=batch.positions)
        rows = jnp.arange(s)
        dec_ctx = jnp.where(rows < batch.num_decode, batch.context_len, 0)
        dec = pk.paged_decode_attention(q[:s], k_all, v_all, tables, dec_ctx, scale=scale,
                                        num_programs=self._np("decode_attention"), interpret=self._interpret)
        dec_full = dec if s == t else jnp.zeros_like(q).at[:s].set(dec)
        if batch.decode_only:  # no prefill chunk: its kernel is skipped
            return dec_full
        is_dec = jnp.arange(t) < batch.num_decode
        # Decode tokens get position -1: the prefill kernel skips them and writes the
        # other rows into the decode kernel's output in place (no merge pass).
        return prefill(q, positions=jnp.where(is_dec, -1, batch.positions), out=dec_full)


def resolve_kernels(kernels: str) -> str:
    """'auto' -> 'pallas' on a GPU (measured faster there), 'xla' elsewhere (Pallas would be interpreted)."""
    if kernels == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return kernels


# The ops of `PallasOps` that take an SM budget (`programs`).
BUDGETED_OPS = ("gemm", "decode_attention", "prefill_attention", "norm", "rope", "write_kv")


def programs_key(programs: Mapping[str, int] | None) -> tuple[tuple[str, int], ...]:
    """SM budgets by op as a sorted tuple (hashable: a static jit argument), checked."""
    for op, n in (programs or {}).items():
        if op not in BUDGETED_OPS:
            raise ValueError(f"no kernel named {op!r} takes an SM budget; choose from {BUDGETED_OPS}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"the SM budget of {op!r} must be an integer >= 1, got {n!r}")
    return tuple(sorted((programs or {}).items()))


def with_programs(ops: XlaOps, programs: Mapping[str, int] | tuple[tuple[str, int], ...]) -> XlaOps:
    """The same kernel set with these SM budgets (the XLA ops take none: unchanged)."""
    if not isinstance(ops, PallasOps):
        return ops
    return dataclasses.replace(ops, programs=programs_key(dict(programs)))


def get_ops(kernels: str | XlaOps, programs: Mapping[str, int] | None = None,
            fuse_rope_kv: bool = False) -> XlaOps:
    """The kernel set by name (an instance passes through); fuse_rope_kv only changes the
    Pallas sets (the XLA ops compute the same rotation either way)."""
    if isinstance(kernels, XlaOps):
        return kernels
    kernels = resolve_kernels(kernels)
    if kernels == "xla":
        return XlaOps()
    if kernels in ("pallas", "hybrid"):
        return PallasOps(programs=programs_key(programs), xla_gemm=kernels == "hybrid",
                         fuse_rope_kv=fuse_rope_kv)
    raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {kernels!r}")
