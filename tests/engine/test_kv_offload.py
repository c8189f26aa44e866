"""KV offload to host memory and disk: pages copied out and back bit for bit, the host LRU,
and engines that reload offloaded prefixes (across a restart too) with the same greedy
tokens as the dense reference, through corrupt entries and a failing disk."""

from __future__ import annotations

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine import kv_disk, kv_offload
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.kv_offload import KVOffloader, host_sharding
from nanoflow_jax.engine.prefix_cache import page_key
from nanoflow_jax.engine.sequence import Sequence
from nanoflow_jax.models.paged import KVCache
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 4 * 2 * 16 * 4     # TINY: K and V, 2 layers, 4 tokens, 2 heads of 16, float32
HOST_GB = 512 * PAGE_BYTES / 2**30      # room for 512 pages


def keys(n: int, tag: int = 0) -> list[bytes]:
    return [page_key(b"", [tag, i]) for i in range(n)]


@pytest.mark.parametrize("chunk", [None, 2])
def test_pages_go_to_host_and_back_bit_for_bit(monkeypatch, chunk):
    if chunk is not None:   # more pages than one gather or scatter takes: two of each, the last padded
        monkeypatch.setattr(kv_offload, "LOAD_CHUNK", chunk)
    shape = (2, 10, 4, 2, 16)
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    off = KVOffloader(1 << 20, PAGE_BYTES)
    off.save(KVCache(jnp.asarray(k), jnp.asarray(v)), [(3, keys(3)[0]), (7, keys(3)[1]), (5, keys(3)[2])])
    assert [len(saved) for saved, _ in off._saving] == ([3] if chunk is None else [2, 1])
    if host_sharding() is not None:   # jax's CPU backend has pinned host memory: the in-jit path is tested
        assert off._saving[0][1].sharding.memory_kind == "pinned_host"
    off.land(wait=True)
    assert off.num_host_pages == 3 and off.find(keys(3)) == 3 and off.find(keys(3)[1:]) == 2
    assert off.find(keys(2, tag=1)) == 0
    # Each page owns its memory: a view of the copied window would keep it all alive.
    assert all(page.flags.owndata for page in off._host.values())
    # Load them into other pages of an empty cache: exactly those pages change.
    off.queue_load([1, 9, 2], off.take(keys(3), 3))
    cache = off.dispatch_loads(KVCache(jnp.zeros(shape), jnp.zeros(shape)))
    got_k, got_v = np.asarray(cache.k), np.asarray(cache.v)
    for dst, src in ((1, 3), (9, 7), (2, 5)):
        np.testing.assert_array_equal(got_k[:, dst], k[:, src])
        np.testing.assert_array_equal(got_v[:, dst], v[:, src])
    assert not got_k[:, [3, 4, 5, 6, 7, 8]].any()
    assert off.stats.saved_pages == 3 and off.stats.loaded_pages == 3


def test_host_lru_keeps_the_budget():
    shape = (2, 8, 4, 2, 16)
    cache = KVCache(jnp.ones(shape), jnp.ones(shape))
    off = KVOffloader(3 * PAGE_BYTES, PAGE_BYTES)
    ks = keys(5)
    off.save(cache, [(1, ks[0]), (2, ks[1]), (3, ks[2])])
    off.land(wait=True)
    assert len(off.take(ks, 2)) == 2 and len(off.take(ks[3:], 9)) == 0
    off.queue_load([4], off.take(ks[:1], 1))  # a reload makes page 0 the most recent
    cache = off.dispatch_loads(cache)        # the cache is donated: keep the returned one
    off.save(cache, [(5, ks[3]), (6, ks[4])])
    off.land(wait=True)
    assert [off.find([k]) for k in ks] == [1, 0, 0, 1, 1] and off.stats.host_evictions == 2


def test_prefetch_uploads_host_pages_ahead_within_its_budget():
    """`prefetch` copies the host pages of a prefix to the device on the uploader thread (at
    most PREFETCH_BYTES of them); `take` hands the uploaded copies over, and they load bit
    for bit; a page never uploaded still comes from host memory."""
    shape = (2, 8, 4, 2, 16)
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    cache = KVCache(jnp.asarray(k), jnp.asarray(v))
    off = KVOffloader(8 * PAGE_BYTES, PAGE_BYTES, device=cache.k.sharding, prefetch_bytes=2 * PAGE_BYTES)
    ks = keys(4)
    off.save(cache, [(1, ks[0]), (2, ks[1]), (3, ks[2])])
    off.land(wait=True)
    off.prefetch(ks)                 # ks[3] is in no tier: the walk stops there
    off.settle()
    assert not off.uploading(ks) and list(off._uploaded) == ks[:2], "the budget holds two pages"
    got = off.take(ks, 4)
    assert len(got) == 3 and [isinstance(p, jax.Array) for p in got] == [True, True, False]
    assert off.stats.prefetched_pages == 2 and not off._uploaded, "uploaded pages are handed over once"
    off.queue_load([5, 6, 7], got)
    cache = off.dispatch_loads(KVCache(jnp.zeros(shape), jnp.zeros(shape)))
    for dst, src in ((5, 1), (6, 2), (7, 3)):
        np.testing.assert_array_equal(np.asarray(cache.k)[:, dst], k[:, src])
        np.testing.assert_array_equal(np.asarray(cache.v)[:, dst], v[:, src])
    off.prefetch(ks)
    off.clear()                      # forgets uploads too, those in flight included
    off.settle()
    assert not off._uploaded and not off.uploading(ks) and off.take(ks, 4) == []


def test_a_dropped_offloader_is_freed_and_its_threads_end(tmp_path):
    """The offloader's threads do not keep it alive: dropped (with its engine), its host and
    device pages are freed and its threads end."""
    import gc
    import threading
    import weakref

    before = set(threading.enumerate())
    shape = (2, 8, 4, 2, 16)
    cache = KVCache(jnp.ones(shape), jnp.ones(shape))
    disk = kv_disk.DiskKVStore(tmp_path, 1 << 20, {"model": "t"}, dtype=jnp.float32)
    off = KVOffloader(8 * PAGE_BYTES, PAGE_BYTES, disk=disk, device=cache.k.sharding)
    mine = [t for t in threading.enumerate() if t not in before and t.name.startswith(("kv-offload-", "kv-disk-r"))]
    assert sorted(t.name for t in mine) == ["kv-disk-reader", "kv-offload-lander", "kv-offload-uploader"]
    off.save(cache, [(1, keys(2)[0]), (2, keys(2)[1])])
    off.land(wait=True)
    off.prefetch(keys(2))
    off.settle()
    assert off.num_host_pages == 2 and len(off._uploaded) == 2
    gone = weakref.ref(off)
    del off
    gc.collect()
    assert gone() is None, "a thread keeps the offloader alive"
    for t in mine:
        t.join(timeout=5)
        assert not t.is_alive(), f"{t.name} outlived its offloader"
    disk.close()


def test_a_copy_that_fails_to_land_is_dropped_and_the_lander_serves_on(caplog):
    """The lander thread reads copies out of pinned memory; one that fails (a device error
    surfacing there) is logged and forgotten, its pages saved again later, the thread alive."""
    class Broken:
        def __array__(self, *a, **k):
            raise RuntimeError("INTERNAL: device copy failed")

    shape = (2, 8, 4, 2, 16)
    cache = KVCache(jnp.ones(shape), jnp.ones(shape))
    off = KVOffloader(8 * PAGE_BYTES, PAGE_BYTES)
    ks = keys(3)
    off._saving_keys.update(ks[:2])
    off._saving.append((ks[:2], Broken()))
    off.land(wait=True)
    assert "device copy failed" in caplog.text and off.num_host_pages == 0 and not off._saving_keys
    off.save(cache, [(1, ks[0]), (2, ks[1]), (3, ks[2])])   # saved again, and it lands
    off.land(wait=True)
    assert off.find(ks) == 3 and off.stats.saved_pages == 3


def test_config_checks_name_the_fix():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(kv_offload_host_gb=1.0, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_offload_disk_gb"):
        EngineConfig(kv_offload_host_gb=1.0, kv_offload_disk_path="/tmp/x")
    with pytest.raises(ValueError, match=">= 0"):
        EngineConfig(kv_offload_host_gb=-1.0)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineConfig(kv_offload_host_gb=1.0, tensor_parallel_size=2)


def _seq(prompt: list[int]) -> Sequence:
    return Sequence(request_id="probe", arrival=0, prompt=None, prompt_token_ids=prompt, params=GREEDY,
                    seed=0, max_tokens=8)


def tokens(llm, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def flood(llm) -> None:
    """Run other prompts through the whole pool, so every cached page is evicted from the device."""
    for p in random_prompts(4, [56] * 4, seed=99):
        tokens(llm, [p])


@pytest.fixture(scope="module")
def convs() -> list[list[int]]:
    return random_prompts(4, [36, 44, 40, 24], seed=21)   # 44 of the 47 pages at once: no preemption


@pytest.fixture(scope="module")
def reference(convs) -> list[list[int]]:
    return reference_greedy(convs, GREEDY.max_tokens)


@pytest.mark.parametrize("pages_per_step", [8, 1, None], ids=["ring", "small_ring_overflows", "no_ring"])
def test_host_tier_reloads_evicted_prefixes(convs, reference, pages_per_step):
    """Through the staging ring (or one page a step, so that most pages overflow to the
    direct gather) and through the direct gather alone (the default on CPU)."""
    llm = make_llm(kv_offload_host_gb=HOST_GB, kv_offload_pages_per_step=pages_per_step)
    eng = llm.engine
    assert tokens(llm, convs) == reference
    flood(llm)
    assert eng.blocks.prefix_cache.lookup(eng.scheduler._keys(_seq(convs[0]), 1)) == [], "evicted from the device"
    prefilled = eng.num_prefill_tokens
    assert tokens(llm, convs) == reference
    # Everything but each prompt's last partial page comes back from host memory.
    assert eng.num_prefill_tokens - prefilled == sum(len(c) - (len(c) - 1) // 4 * 4 for c in convs)
    assert eng.offload.stats.loaded_pages == sum((len(c) - 1) // 4 for c in convs)
    assert eng.blocks.all_free()
    assert (eng.offload.ring is None) == (pages_per_step is None)
    timed = eng.offload.stats   # where the offload's time goes, on which thread
    assert timed.save_s > 0 and timed.load_s > 0 and timed.lander_s > 0 and timed.max_backlog_pages > 0
    stats = eng.stats()    # what a server exports as metrics
    assert (stats["kv_offload_loaded_pages"], stats["kv_offload_saved_pages"]) == (
        eng.offload.stats.loaded_pages, eng.offload.stats.saved_pages)
    assert 0 < stats["prefix_cache_hits"] == eng.prefix_cache_stats.hits <= stats["prefix_cache_queries"]
    assert llm.reset_prefix_cache() and eng.offload.num_host_pages == 0


def run_settled(llm, prompts: list[list[int]]) -> list[list[int]]:
    """Add the requests, let the disk reads land, then serve them."""
    eng = llm.engine
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    eng.offload.settle()
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
    return [done[i] for i in ids]


def test_disk_tier_survives_a_restart_and_drops_a_corrupt_page(tmp_path, convs, reference, caplog):
    kw = dict(kv_offload_host_gb=HOST_GB, kv_offload_disk_path=str(tmp_path), kv_offload_disk_gb=0.01)
    first = make_llm(**kw)
    assert tokens(first, convs) == reference
    first.engine.offload.disk.close()
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == sum((len(c) + 8 - 1) // 4 for c in convs)   # every full page: prompt and output
    # Damage one page of the first conversation: it is recomputed, the rest reloaded.
    second_page = _seq(convs[0])
    key = make_llm().engine.scheduler._keys(second_page, 2)[1]
    f = tmp_path / f"{key.hex()}.npy"
    f.write_bytes(f.read_bytes()[:-7])
    restarted = make_llm(**kw)
    eng = restarted.engine
    assert len(eng.offload.disk) == len(files)
    assert run_settled(restarted, convs) == reference
    assert eng.offload.disk.corrupt == 1 and "corrupt" in caplog.text
    hits = sum((len(c) - 1) // 4 for c in convs[1:]) + 1   # conversation 0 stops at its damaged page
    assert eng.offload.stats.loaded_pages == hits and eng.prefix_cache_stats.hits == 4 * hits
    assert eng.blocks.all_free()


def test_a_failing_disk_loses_no_request(tmp_path, convs, reference, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_disk.os, "replace", full)
    llm = make_llm(kv_offload_host_gb=HOST_GB, kv_offload_disk_path=str(tmp_path), kv_offload_disk_gb=0.01)
    assert tokens(llm, convs) == reference
    flood(llm)
    assert tokens(llm, convs) == reference          # the host tier still serves
    disk = llm.engine.offload.disk
    disk.flush()
    assert disk.write_errors > 0 and len(disk) == 0 and llm.engine.offload.stats.loaded_pages > 0
    assert llm.engine.blocks.all_free()


@pytest.mark.parametrize("disk", [False, True], ids=["host", "disk"])
def test_reloads_upload_ahead_while_the_requests_wait(tmp_path, convs, reference, disk):
    """Requests added together, their pages uploaded while they wait (from host memory, or
    read from disk after a restart): every reloaded page is a device-to-device copy."""
    kw = dict(kv_offload_host_gb=HOST_GB)
    if disk:
        kw.update(kv_offload_disk_path=str(tmp_path), kv_offload_disk_gb=0.01)
    llm = make_llm(**kw)
    assert tokens(llm, convs) == reference
    if disk:
        llm.engine.offload.disk.close()
        llm = make_llm(**kw)
    else:
        flood(llm)
    eng = llm.engine
    assert run_settled(llm, convs) == reference
    stats = eng.offload.stats
    assert stats.loaded_pages == sum((len(c) - 1) // 4 for c in convs) == stats.prefetched_pages
    assert not eng.offload._uploaded and eng.blocks.all_free()


def test_a_failing_upload_loads_at_admission_instead(convs, reference, monkeypatch, caplog):
    """An upload that fails (device memory short, say) is logged; the pages still load from
    host memory when the request is admitted, and nobody waits on them."""
    llm = make_llm(kv_offload_host_gb=HOST_GB)
    assert tokens(llm, convs) == reference
    flood(llm)
    eng = llm.engine

    def device_put(x, device=None, **kw):
        if device is uploads:   # the uploader's transfers only
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while uploading")
        return real(x, device, **kw)

    real, uploads = kv_offload.jax.device_put, object()
    eng.offload._device = uploads
    monkeypatch.setattr(kv_offload.jax, "device_put", device_put)
    assert run_settled(llm, convs) == reference
    stats = eng.offload.stats
    assert "uploading KV pages to the device failed" in caplog.text
    assert stats.prefetched_pages == 0 and stats.loaded_pages == sum((len(c) - 1) // 4 for c in convs)
    assert not eng.offload._uploading and eng.blocks.all_free()


def test_the_same_conversation_twice_at_once_loads_it_once(convs, reference):
    llm = make_llm(kv_offload_host_gb=HOST_GB)
    eng = llm.engine
    assert tokens(llm, convs[:1]) == reference[:1]
    flood(llm)
    loaded = eng.offload.stats.loaded_pages
    # Both admitted in one batch: the second maps the pages the first loads (cached at once).
    assert tokens(llm, [convs[0], convs[0]]) == [reference[0], reference[0]]
    assert eng.offload.stats.loaded_pages - loaded == (len(convs[0]) - 1) // 4
    assert eng.blocks.all_free()


@pytest.mark.parametrize("pages_per_step", [None, 5], ids=["no_ring", "ring_of_20"])
def test_precompiled_engine_never_compiles_page_copies_while_serving(convs, reference, pages_per_step):
    """Start-up compiles every page copy serving can dispatch: the gathers and scatters, and
    the ring's fills (a ring of 20 slots pads a fill of 17 pages to 20, not 32)."""
    from tests.engine.conftest import count_compiles

    llm = make_llm(kv_offload_host_gb=HOST_GB, precompile=True, kv_offload_pages_per_step=pages_per_step)
    with count_compiles() as events:
        assert tokens(llm, convs) == reference
        flood(llm)
        assert tokens(llm, convs) == reference
    assert events == [], f"serving traced or compiled: {events}"
    assert llm.engine.offload.stats.loaded_pages > 0 and llm.engine.offload.stats.saved_pages > 0


def test_an_fp8_cache_serves_and_reloads_from_disk_bit_for_bit(tmp_path, convs, reference):
    """kv_cache_dtype="fp8": the engine serves from an e4m3 cache (its greedy tokens mostly the
    float32 reference's), and its pages go to disk and come back unchanged after a restart."""
    kw = dict(kv_cache_dtype="fp8", kv_offload_host_gb=HOST_GB, kv_offload_disk_path=str(tmp_path),
              kv_offload_disk_gb=0.01)
    first = make_llm(**kw)
    assert first.engine.runner.cache.k.dtype == jnp.float8_e4m3fn
    want = tokens(first, convs)
    agree = sum(a == b for w, r in zip(want, reference) for a, b in zip(w, r))
    assert agree >= sum(map(len, reference)) // 2, (want, reference)
    first.engine.offload.disk.close()
    restarted = make_llm(**kw)
    assert run_settled(restarted, convs) == want
    assert restarted.engine.offload.stats.loaded_pages == sum((len(c) - 1) // 4 for c in convs)
    assert restarted.engine.blocks.all_free()


def test_pages_evicted_while_a_request_waits_upload_before_its_admission(convs, reference):
    """A request whose prefix is on the device when it arrives, then evicted to host memory
    by those ahead of it while it waits: its pages are uploaded while it is next in line,
    so its admission is a device-to-device copy."""
    llm = make_llm(kv_offload_host_gb=HOST_GB, max_num_seqs=1)
    eng = llm.engine
    assert tokens(llm, [convs[0]]) == [reference[0]]
    prefix = eng.scheduler._keys(_seq(convs[0]), (len(convs[0]) - 1) // 4)
    floods = [eng.add_request(p, GREEDY) for p in random_prompts(4, [56] * 4, seed=99)]
    rid = eng.add_request(convs[0], GREEDY)
    assert eng.offload.stats.prefetched_pages == 0 and not eng.offload.uploading(prefix), "on the device"
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
        eng.offload.settle()   # each upload in place before the next step, as a slower step would let it
    assert len(done) == len(floods) + 1 and done[rid] == reference[0]
    stats = eng.offload.stats
    assert stats.loaded_pages == len(prefix) == stats.prefetched_pages
    assert eng.blocks.all_free()


def test_saves_beyond_the_backlog_are_skipped_not_queued(monkeypatch):
    """Copies to host memory that fall behind skip pages (counted) rather than pin more."""
    monkeypatch.setattr(kv_offload, "BACKLOG_BYTES", 5 * PAGE_BYTES)
    shape = (2, 12, 4, 2, 16)
    cache = KVCache(jnp.ones(shape), jnp.ones(shape))
    off = KVOffloader(1 << 20, PAGE_BYTES)
    off.save(cache, list(zip(range(1, 4), keys(3))))
    off.save(cache, list(zip(range(4, 8), keys(4, tag=1))))   # 3 in flight: room for 2 of these 4
    assert off.stats.skipped_pages == 2 and sum(len(k) for k, _ in off._saving) == 5
    assert off.stats.max_backlog_pages == 5
    off.land(wait=True)
    assert off.num_host_pages == 5 and off.stats.saved_pages == 5
    off.save(cache, list(zip(range(8, 11), keys(3, tag=2))))   # landed: room again
    off.land(wait=True)
    assert off.num_host_pages == 8 and off.stats.skipped_pages == 2
