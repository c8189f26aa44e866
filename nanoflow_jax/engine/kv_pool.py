"""The KV page pool's size: an explicit page count, or what free device memory holds once
the compiled step's scratch (and any reserved bytes) are set aside; a default on CPU."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.models.paged import kv_bytes_per_page

log = logging.getLogger(__name__)

DEFAULT_GPU_FRACTION = 0.8  # of free device memory; the rest is activation headroom
CPU_DEFAULT_KV_BYTES = 1 << 30


def resolve_num_pages(cfg: EngineConfig, model_cfg: ModelConfig, dtype: jnp.dtype,
                      step_temp_bytes: Callable[[Sequence[int]], list[int]], reserved_bytes: int = 0) -> int:
    """Pages in the pool: explicit, a fraction of free device memory, or a CPU default.

    `step_temp_bytes(pool_sizes)` is the compiled step's scratch memory with each pool. It
    is measured at two pool sizes and fitted as a + b * pages, because the scratch may
    grow with the pool (e.g. a layer scan that rebuilds the cache rather than updating it
    in place): the pool is then sized so that pool + scratch fit the memory budget.
    `reserved_bytes` (the offload staging ring) come off the free memory first.
    """
    per_page = kv_bytes_per_page(model_cfg, cfg.block_size, dtype)
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0) - reserved_bytes
            if stats and "bytes_limit" in stats else None)
    if cfg.num_kv_pages is not None:
        if free is not None and cfg.num_kv_pages * per_page > free:
            # Caught here, not as every request's out-of-memory error in its first step.
            raise ValueError(
                f"num_kv_pages={cfg.num_kv_pages} needs {cfg.num_kv_pages * per_page / 2**30:.2f} GiB "
                f"({per_page / 2**20:.2f} MiB a page), but only {free / 2**30:.2f} GiB of the "
                f"{stats['bytes_limit'] / 2**30:.2f} GiB JAX reserved on the device is free: pass at most "
                f"{int(free // per_page)} pages less the step's scratch, leave num_kv_pages unset to size "
                "the pool from free memory, or raise XLA_PYTHON_CLIENT_MEM_FRACTION")
        return cfg.num_kv_pages
    if free is not None:
        budget = free * (cfg.kv_memory_fraction or DEFAULT_GPU_FRACTION)
        p1, p2 = 16, 16 + 4096
        t1, t2 = step_temp_bytes([p1, p2])
        slope = max(0.0, (t2 - t1) / (p2 - p1))
        base = max(0.0, t1 - slope * p1)
        n = int((budget - base) // (per_page + slope))
        log.info("KV pool: %.2f GiB free, step scratch %.2f GiB + %.0f B/page -> %d pages",
                 free / 2**30, base / 2**30, slope, n)
        if n < 2:
            raise ValueError(f"only {free / 2**20:.0f} MiB of device memory is free, too little for "
                             f"two KV pages of {per_page / 2**20:.2f} MiB plus the step's scratch: use a "
                             "smaller model, block_size or max_num_batched_tokens, or pass num_kv_pages")
        return n
    if cfg.kv_memory_fraction is not None:
        raise ValueError(f"kv_memory_fraction needs device memory statistics, which the "
                         f"{jax.default_backend()} backend does not report: pass num_kv_pages instead")
    n = min(1 + cfg.max_num_seqs * cfg.max_pages_per_seq, max(2, CPU_DEFAULT_KV_BYTES // per_page))
    log.warning("%s reports no memory statistics: using num_kv_pages=%d (%.0f MiB); pass "
                "num_kv_pages=... to choose", jax.default_backend(), n, n * per_page / 2**20)
    return n
