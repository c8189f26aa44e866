"""The sharded forward equals the one-device forward: same logits, same cache, every pipeline.

A random cache (so every token attends over a non-trivial prefix) and a hand-packed batch
of a decode, a prefill chunk over a cached prefix and a fresh prompt go through
`forward_paged` on one device and through `sharded_forward` over 2 and 4 devices. The
tiny model has 4 query heads and 2 KV heads: TP=2 splits the KV heads, TP=4 keeps each
on the two devices of its group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from nanoflow_jax.config import PIPELINES
from nanoflow_jax.models.llama import forward_paged
from nanoflow_jax.models.paged import KVCache
from nanoflow_jax.models.params import fuse_qkv
from nanoflow_jax.parallel.forward import sharded_forward
from nanoflow_jax.parallel.sharding import TensorParallel
from tests.models.batching import pack_batch
from tests.parallel.host_devices.conftest import TINY, assert_split_over, tiny_params

PAGE, PAGES, WIDTH = 4, 24, 6


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, TINY.vocab_size, 24).tolist() for _ in range(3)]
    # (tokens, start, n, block table): a decode at position 13, a chunk of 6 after 8 cached
    # tokens, a fresh 5-token prompt; pages out of order, none shared.
    reqs = [(tokens[0], 13, 1, [5, 2, 9, 11]), (tokens[1], 8, 6, [7, 1, 3, 4]), (tokens[2], 0, 5, [12, 6])]
    return pack_batch(reqs, PAGE, T=16, S=4, W=WIDTH)


def _cache(seed: int) -> KVCache:
    shape = (TINY.num_layers, PAGES, PAGE, TINY.num_kv_heads, TINY.head_dim)
    k, v = jax.random.normal(jax.random.PRNGKey(seed), (2, *shape), jnp.float32)
    return KVCache(k=k, v=v)


CASES = [*[(2, True, "xla", pipeline) for pipeline in PIPELINES], (2, False, "xla", "sequential"),
         (4, True, "xla", "nanobatch"),
         # The Pallas kernels (interpreted on CPU: slow) run per device on local heads, as XLA's ops do.
         pytest.param(2, True, "pallas", "sequential", marks=pytest.mark.slow)]


@pytest.mark.parametrize("size,fused,kernels,pipeline", CASES)
def test_sharded_forward_matches_one_device(size, fused, kernels, pipeline):
    params = fuse_qkv(tiny_params()) if fused else tiny_params()
    cache, batch = _cache(size), _batch(size)
    ref_logits, ref_cache = jax.jit(lambda p, c, b: forward_paged(p, c, b, TINY))(params, cache, batch)

    tp = TensorParallel.create(TINY, size)
    sharded = tp.shard_params(params)
    slots = tp.kv_head_map()
    kv = NamedSharding(tp.mesh, tp.kv_spec)
    tp_cache = KVCache(k=jax.device_put(cache.k[..., slots, :], kv), v=jax.device_put(cache.v[..., slots, :], kv))
    run = jax.jit(lambda p, c, b: sharded_forward(tp, p, c, b, TINY, kernels, pipeline))
    logits, out = run(sharded, tp_cache, batch)

    assert_split_over(out.k, size, axis=3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    for got, want in ((out.k, ref_cache.k), (out.v, ref_cache.v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want)[..., slots, :], rtol=1e-5, atol=1e-5)
