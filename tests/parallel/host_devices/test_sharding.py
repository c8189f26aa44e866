"""The tensor-parallel layout: which KV head each pool slot holds, and each device's weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nanoflow_jax.models.params import fuse_qkv
from nanoflow_jax.parallel.sharding import TensorParallel
from tests.parallel.host_devices.conftest import TINY, assert_split_over, tiny_params


@pytest.mark.parametrize("heads,kv_heads,size,expected", [
    (4, 2, 2, [0, 1]),         # split: one KV head a device
    (4, 2, 4, [0, 0, 1, 1]),   # kept per group: devices 0-1 read KV head 0, 2-3 head 1
    (4, 1, 4, [0, 0, 0, 0]),   # one KV head on every device
    (8, 4, 2, [0, 1, 2, 3]),   # two KV heads a device
])
def test_kv_head_map_follows_the_query_heads(heads, kv_heads, size, expected):
    cfg = dataclasses.replace(TINY, num_heads=heads, num_kv_heads=kv_heads)
    tp = TensorParallel.create(cfg, size)
    assert tp.kv_head_map().tolist() == expected
    local = tp.local_config
    assert (local.num_heads, local.num_kv_heads) == (heads // size, len(expected) // size)
    # Each device's query heads read the KV heads in its own slots (GQA group = head // group size).
    group = heads // kv_heads
    for device in range(size):
        q_heads = range(device * local.num_heads, (device + 1) * local.num_heads)
        own = set(expected[device * local.num_kv_heads:(device + 1) * local.num_kv_heads])
        assert {h // group for h in q_heads} == own


def test_each_device_holds_its_own_qkv_columns():
    """The fused QKV of device i is [q_i, k_i, v_i] of the separate projections."""
    tp = TensorParallel.create(TINY, 4)
    params = tiny_params()
    sharded = tp.shard_params(fuse_qkv(params))
    w = sharded["layers"]["wqkv"]
    assert_split_over(w, 4, axis=2)
    assert_split_over(sharded["layers"]["wo"], 4, axis=1)
    assert_split_over(sharded["layers"]["w_down"], 4, axis=1)
    d, hl = TINY.head_dim, TINY.num_heads // 4
    lay = params["layers"]
    for shard in w.addressable_shards:
        i = list(tp.mesh.devices).index(shard.device)
        kv = tp.kv_head_map()[i]
        want = np.concatenate([np.asarray(lay["wq"])[..., i * hl * d:(i + 1) * hl * d],
                               np.asarray(lay["wk"])[..., kv * d:(kv + 1) * d],
                               np.asarray(lay["wv"])[..., kv * d:(kv + 1) * d]], axis=-1)
        np.testing.assert_array_equal(np.asarray(shard.data), want)


@pytest.mark.parametrize("size", [2, 4])
def test_weights_born_split_equal_weights_born_whole(size):
    """Random weights created straight onto their devices (a model too big for one) have
    the values of the one-device initialisation, each leaf split as `load_shardings` says."""
    import jax

    from nanoflow_jax.models.params import init_params

    tp = TensorParallel.create(TINY, size)
    whole = init_params(TINY, jax.random.key(5))
    split = init_params(TINY, jax.random.key(5), shardings=tp.load_shardings())
    assert_split_over(split["layers"]["w_up"], size, axis=2)
    assert_split_over(split["layers"]["wo"], size, axis=1)
    kv_split = TINY.num_kv_heads % size == 0
    assert split["layers"]["wk"].sharding.is_fully_replicated == (not kv_split)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
