"""The offload staging ring: pages staged, sent a window per step (as the step does, inside a
jitted program) and landed bit for bit; a full ring takes no more; a window whose step never
ran goes out again; flush sends what no step will."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.kv_offload import _bucket, host_sharding
from nanoflow_jax.engine.kv_stage import StageRing, StageSpec, send_window, stage_spec
from nanoflow_jax.models.paged import KVCache

SHAPE = (3, 12, 4, 2, 8)   # layers, pages, page size, KV heads, head dim


def random_cache(seed: int) -> tuple[KVCache, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    return KVCache(jnp.asarray(k), jnp.asarray(v)), k, v


def step(send, host):
    """A stand-in for the engine's step: the window leaves inside a jitted program."""
    out = jax.jit(send_window, static_argnums=(2, 3))(send.stage, np.int32(send.index), 2, host)
    send.on_sent(out)


def check(landed, pages: dict[bytes, int], k: np.ndarray, v: np.ndarray) -> int:
    n = 0
    for keys, buf in landed:
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(buf[0, :, i], k[:, pages[key]])
            np.testing.assert_array_equal(buf[1, :, i], v[:, pages[key]])
            n += 1
    return n


def test_pages_travel_through_the_ring_bit_for_bit():
    cache, k, v = random_cache(0)
    host = host_sharding()
    ring = StageRing(StageSpec(window=2, windows=3), cache, host)
    order = np.random.default_rng(1).permutation(np.arange(1, 12))
    pages = {bytes([int(p)]): int(p) for p in order}
    todo = list((p, key) for key, p in pages.items())
    assert ring.fill(cache, todo, _bucket) == 6          # three windows of two: full
    assert ring.fill(cache, todo[6:], _bucket) == 0
    landed = []
    for _ in range(3):
        step(ring.next_send(), host)
    if host is not None:
        assert ring._sent[0][2].sharding.memory_kind == "pinned_host"
    landed += ring.land(wait=True)
    assert check(landed, pages, k, v) == 6
    # The freed windows take the rest, the last one half full; a step sends it.
    assert ring.fill(cache, todo[6:], _bucket) == 5
    for _ in range(3):
        step(ring.next_send(), host)
    assert check(ring.land(wait=True), pages, k, v) == 5
    idle = ring.next_send()                               # nothing staged: an ignored send
    idle.on_sent(None)
    assert ring.land(wait=True) == []


def test_a_window_whose_step_never_ran_goes_out_again_and_flush_sends_the_rest():
    cache, k, v = random_cache(2)
    ring = StageRing(StageSpec(window=2, windows=2), cache, host_sharding())
    pages = {b"a": 3, b"b": 5, b"c": 7}
    ring.fill(cache, [(p, key) for key, p in pages.items()], _bucket)
    lost = ring.next_send()                               # its step raised before dispatch
    again = ring.next_send()
    assert again.index == lost.index
    step(again, ring.host)
    ring.flush()                                          # the half window, with no step coming
    assert check(ring.land(wait=True), pages, k, v) == 3
    assert len(ring._free) == 2


def test_the_window_is_sized_by_bytes_and_checked():
    assert stage_spec(0, 1 << 20) is None
    assert stage_spec(None, 2 << 20).window == 8           # 16 MiB of 2 MiB pages
    assert stage_spec(None, 64).window == 256              # at most 256 pages
    assert stage_spec(5, 1 << 20).window == 5
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="kv_offload_pages_per_step"):
            EngineConfig(kv_offload_pages_per_step=bad)
