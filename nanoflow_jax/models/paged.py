"""The paged KV cache and the metadata of one dense batch (layouts: docs/architecture.md)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig

NULL_PAGE = 0  # never allocated: padding tokens write here, padded block tables point here


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values, each [L, num_pages, page_size, num_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


# EngineConfig.kv_cache_dtype -> the cache's dtype (vLLM's names); "auto": the weights' dtype.
KV_CACHE_DTYPES = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}


def kv_cache_dtype(name: str, weights_dtype: jnp.dtype) -> jnp.dtype:
    """The cache dtype EngineConfig.kv_cache_dtype names ("auto": the weights')."""
    return jnp.dtype(weights_dtype) if name == "auto" else jnp.dtype(KV_CACHE_DTYPES[name])


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int,
                      dtype: jnp.dtype = jnp.float32) -> KVCache:
    """Zeroed cache created directly on the default device, committed to it: the compiled
    steps return it committed, so the jitted page copies see one placement before and
    during serving (a committed and an uncommitted argument are two compiles)."""
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    dev = jax.devices()[0]
    return KVCache(k=jnp.zeros(shape, dtype, device=dev), v=jnp.zeros(shape, dtype, device=dev))


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """Bytes one page takes across all layers, keys and values."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BatchInputs:
    """One iteration's dense batch. T tokens, S request rows, W block-table width (all buckets)."""

    token_ids: jax.Array     # [T]
    positions: jax.Array     # [T]
    slot_mapping: jax.Array  # [T]
    token_seq: jax.Array     # [T]
    query_start: jax.Array   # [S+1]
    query_len: jax.Array     # [S]
    context_len: jax.Array   # [S]
    block_table: jax.Array   # [S, W]
    logits_index: jax.Array  # [S]
    num_decode: jax.Array    # []
    # Static: every row is one decode token (no prefill chunk), so the attention may skip
    # its prefill kernel. A separate compiled step; False is always correct.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static: no token of this batch is a decode (a nano-batch cut after every decode row),
    # so the attention may skip its decode kernel. False is always correct.
    prefill_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.query_len.shape[0]

    def token_slice(self, start: int, stop: int) -> "BatchInputs":
        """Tokens [start, stop) with every request row kept: one nano-batch of the dense batch.

        Decode rows are tokens [0, num_decode) and num_decode <= num_seqs, so a slice that
        starts at num_seqs or later holds no decode token (`prefill_only`)."""
        if not 0 <= start < stop <= self.num_tokens:
            raise ValueError(f"token slice [{start}, {stop}) is not inside the batch's {self.num_tokens} tokens")
        if 0 < start < self.num_seqs:
            # The decode kernel reads rows [0, num_seqs) as tokens [0, num_seqs).
            raise ValueError(f"a token slice starts at 0 or at num_seqs={self.num_seqs} or later, got {start}")
        return dataclasses.replace(
            self, token_ids=self.token_ids[start:stop], positions=self.positions[start:stop],
            slot_mapping=self.slot_mapping[start:stop], token_seq=self.token_seq[start:stop],
            decode_only=self.decode_only and start == 0,
            prefill_only=self.prefill_only or start >= self.num_seqs)
