"""Tiers 1 and 2 of the KV cache: cached pages kept in host memory (and on disk), found
again by their prefix-cache keys and loaded back into fresh pages.

Saving: a finished request's cached pages, and cached pages the BlockManager evicts while
a batch is formed, still hold their K/V until a later batch overwrites them. Before the
next batch is dispatched, one jitted copy moves the pages not yet in host memory into the
staging ring of `kv_stage`, and the following steps send the ring's windows to pinned host
memory inside their own programs, so the device-to-host copy runs beside compute. Pages
that find the ring full (and every page with `kv_offload_pages_per_step=0`) take the
direct path: one jitted gather whose output lives in pinned host memory, dispatched before
the batch, which waits for its copy. The host reads what a step sent once that step is
done (`land`), so the host never waits on it, and a lander thread reads it out of pinned
memory (a copy of a window, then one per page, kept off the engine's thread). A page lands in
the host LRU (budget `kv_offload_host_gb`); with a disk tier it is also queued for the disk
writer thread (write-through: evicting a page from host memory costs nothing, and the
disk holds the pages across restarts). One lock guards the LRU between the threads.

Loading: when a request is added (`prefetch`), an uploader thread copies the pages of its
prefix that host memory holds to device memory (up to `PREFETCH_BYTES`), and a reader
thread reads those on disk into host memory and uploads them too; the scheduler admits the
request once its uploads are done (the requests behind it go first meanwhile), or at once
when nothing else runs. At admission a request
whose next keys after its device-cached prefix are in host memory (or already uploaded) gets
fresh pages, and a jitted scatter copies the pages in before its batch (dispatched first, so
the device runs it first): uploaded pages are device-to-device copies, and the rest travel as
they lie in host memory, one batched `device_put` on the engine's thread. A page that is in
neither tier when the request is admitted is computed, so a reload never holds anyone up.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.engine.kv_disk import DiskKVStore
from nanoflow_jax.engine.kv_stage import Send, StageRing, StageSpec, stack_pages
from nanoflow_jax.models.paged import NULL_PAGE, KVCache, kv_bytes_per_page

log = logging.getLogger(__name__)


def _bucket(n: int) -> int:
    """Page counts are padded to powers of two (with the null page) to bound compiles."""
    return 1 << max(0, n - 1).bit_length()


def host_sharding() -> jax.sharding.Sharding | None:
    """Pinned host memory of the default device, where the backend has it (else None)."""
    dev = jax.devices()[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except Exception:
        return None
    return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host") if "pinned_host" in kinds else None


# Device memory for pages uploaded ahead of their request's admission (outside the KV pool).
PREFETCH_BYTES = 256 * 2**20

# Pages a reload scatters, and a direct save gathers, at once: each reloaded page is an
# argument of its own (its own transfer, stacked on the device), and a gather's output is
# device memory before it reaches the host; this bounds both.
LOAD_CHUNK = 128


# Copies to host memory not yet landed (pinned host buffers the lander has still to read):
# past this, pages are not saved (they are recomputed when needed), as a disk that falls
# behind skips pages, rather than pin ever more host memory.
BACKLOG_BYTES = 4 * 2**30


def device_bytes(page_bytes: int) -> int:
    """Device memory the offloader uses outside the KV pool: pages uploaded ahead, one
    save's gather and one reload's pages in flight at once."""
    return PREFETCH_BYTES + 2 * LOAD_CHUNK * page_bytes


def _padded(pages: Sequence[int]) -> np.ndarray:
    """Page ids padded with the null page to their bucket."""
    ids = np.full(_bucket(len(pages)), NULL_PAGE, np.int32)
    ids[:len(pages)] = pages
    return ids


def _scatter(cache: KVCache, ids: jax.Array, pages: tuple[jax.Array, ...]) -> KVCache:
    buf = jnp.stack([p.astype(cache.k.dtype) for p in pages], axis=2)   # [2, L, n, page...]
    return KVCache(k=cache.k.at[:, ids].set(buf[0]), v=cache.v.at[:, ids].set(buf[1]))


@dataclasses.dataclass
class OffloadStats:
    saved_pages: int = 0       # device -> host
    direct_pages: int = 0      # of which by a gather before the step (the staging ring was full or off)
    loaded_pages: int = 0      # host -> device (each a page not recomputed)
    prefetched_pages: int = 0  # of which uploaded before their request was admitted
    host_evictions: int = 0
    disk_hits: int = 0         # pages read back from disk into host memory
    skipped_pages: int = 0     # not saved: the copies to host memory were `BACKLOG_BYTES` behind
    max_backlog_pages: int = 0  # the most pages saved and not yet in host memory at once
    save_s: float = 0.0        # the engine's thread in `save` (ring filled, gathers dispatched)
    load_s: float = 0.0        # the engine's thread in `dispatch_loads` (reloads sent and scattered)
    lander_s: float = 0.0      # the lander's thread reading copies out of pinned memory


class KVOffloader:
    def __init__(self, host_budget_bytes: int, page_bytes: int, disk: DiskKVStore | None = None,
                 stage: tuple[StageSpec, KVCache] | None = None, device: jax.sharding.Sharding | None = None,
                 prefetch_bytes: int = PREFETCH_BYTES) -> None:
        self.budget = int(host_budget_bytes)
        self.page_bytes = page_bytes
        self.disk = disk
        self._host: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()  # LRU first
        self._saving: list[tuple[list[bytes], jax.Array]] = []          # gathers not yet landed
        self._saving_keys: set[bytes] = set()
        self._loads: list[tuple[list[int], list[np.ndarray]]] = []      # scatters not yet dispatched
        self._sharding = host_sharding()
        self._gather = jax.jit(stack_pages, out_shardings=self._sharding)
        self._scatter = jax.jit(_scatter, donate_argnums=0)
        self._zero: jax.Array | None = None   # the device's zero page (padding)
        # The staging ring for (spec, a cache of the pool's shape); None: the direct path only.
        self.ring = StageRing(stage[0], stage[1], self._sharding) if stage is not None else None
        self.stats = OffloadStats()
        self._lock = threading.Lock()   # the LRU and the uploads, between the engine and the threads
        # Uploads ahead of admission, on a thread: key -> page on the device, oldest first.
        self._device = device
        self._uploaded: collections.OrderedDict[bytes, jax.Array] = collections.OrderedDict()
        self._max_uploaded = prefetch_bytes // page_bytes if device is not None else 0
        self._uploads: queue.Queue[bytes] = queue.Queue()
        self._uploading: set[bytes] = set()   # queued or in flight
        self._generation = 0                  # bumped by `clear`: uploads begun before it are dropped
        # Disk reads on a thread: (key, page or None) arrive in `_promoted`.
        self._reads: queue.Queue[bytes] = queue.Queue()
        self._promoted: queue.Queue[tuple[bytes, np.ndarray | None]] = queue.Queue()
        self._reading: set[bytes] = set()
        # Finished copies ((keys, buffer)) go to the lander thread, which reads them into the LRU.
        self._landing: queue.Queue[tuple[list[bytes], jax.Array]] = queue.Queue()
        _start(self, self._landing, KVOffloader._land_one, "kv-offload-lander")
        if disk is not None:
            _start(self, self._reads, KVOffloader._read_from, "kv-disk-reader")
        if self._max_uploaded > 0:
            _start(self, self._uploads, KVOffloader._upload_from, "kv-offload-uploader")

    @property
    def num_host_pages(self) -> int:
        return len(self._host)

    def warm_up(self, cache: KVCache, max_pages: int) -> KVCache:
        """Compile the gather and the scatter for every page-count bucket up to `max_pages`
        (at most `LOAD_CHUNK`; each run once on the null page), so serving does not compile them."""
        n = 1
        while True:
            ids = np.full(n, NULL_PAGE, np.int32)
            jax.block_until_ready(self._gather(cache, ids))
            cache = self._scatter(cache, ids, (self._zero_page(cache),) * n)
            if n >= min(max_pages, LOAD_CHUNK):
                break
            n *= 2
        if self.ring is not None:
            self.ring.warm_up(cache)
        return cache

    # ---- saving ----------------------------------------------------------------------

    def save(self, cache: KVCache, pages: Sequence[tuple[int, bytes]]) -> None:
        """Copy out these (page, key) pairs not yet in host memory, into the staging ring or
        by a direct gather, before the batch that may overwrite them is dispatched."""
        start = time.perf_counter()
        try:
            self._save(cache, pages)
        finally:
            self.stats.save_s += time.perf_counter() - start

    def _save(self, cache: KVCache, pages: Sequence[tuple[int, bytes]]) -> None:
        with self._lock:
            todo = {k: p for p, k in pages if k not in self._host and k not in self._saving_keys}
            if not todo or self.budget < self.page_bytes:
                return
            room = max(0, BACKLOG_BYTES // self.page_bytes - len(self._saving_keys))
            if len(todo) > room:
                self.stats.skipped_pages += len(todo) - room
                todo = dict(list(todo.items())[:room])
                if not todo:
                    return
            self._saving_keys.update(todo)
            self.stats.max_backlog_pages = max(self.stats.max_backlog_pages, len(self._saving_keys))
        todo = [(p, k) for k, p in todo.items()]
        if self.ring is not None:
            todo = todo[self.ring.fill(cache, todo, _bucket):]
            if not todo:
                return
        self.stats.direct_pages += len(todo)
        for start, buf in zip(range(0, len(todo), LOAD_CHUNK), self.gather(cache, [p for p, _ in todo])):
            self._saving.append(([k for _, k in todo[start:start + LOAD_CHUNK]], buf))

    def gather(self, cache: KVCache, pages: Sequence[int]) -> list[jax.Array]:
        """These pages' K/V on their way to host memory, a buffer per `LOAD_CHUNK` pages: a
        gather's output is device memory before it reaches the host, so a burst of finished
        requests (thousands of pages) must not gather at once."""
        bufs = []
        for start in range(0, len(pages), LOAD_CHUNK):
            buf = self._gather(cache, _padded(pages[start:start + LOAD_CHUNK]))
            if self._sharding is None:
                buf.copy_to_host_async()
            bufs.append(buf)
        return bufs

    def next_send(self) -> Send | None:
        """What the next step sends to host memory (None: no staging ring)."""
        return self.ring.next_send() if self.ring is not None else None

    def flush(self) -> None:
        """Send the staged pages now rather than with a later step (the engine goes idle)."""
        if self.ring is not None:
            self.ring.flush()

    def land(self, wait: bool = False) -> None:
        """Hand finished copies to the lander thread and move finished disk reads into the
        host LRU (called as an iteration starts: the direct gathers ran before the batch in
        flight, so they are done; a window a step sent goes once that step is done). With
        `wait`, every copy dispatched so far is in host memory when it returns."""
        saving, self._saving = self._saving, []
        if self.ring is not None:
            saving += self.ring.land(wait)
        for item in saving:
            self._landing.put(item)
        if wait:
            self._landing.join()
        with self._lock:
            while not self._promoted.empty():
                key, page = self._promoted.get()
                self._reading.discard(key)
                if page is not None:
                    self._put(key, page)
                    self.stats.disk_hits += 1

    def _land_one(self, item: tuple[list[bytes], jax.Array]) -> None:
        """The lander thread's work on one finished copy."""
        keys, buf = item
        start = time.perf_counter()
        try:
            host = np.asarray(buf)   # out of pinned memory: a copy, on this thread
            # Each page gets its own memory: a view would keep the whole window alive
            # while any one of its pages stays in the LRU, past the host budget.
            pages = [np.array(host[:, :, i]) for i in range(len(keys))]
            del host
            with self._lock:
                for key, page in zip(keys, pages):
                    self._put(key, page)
                self.stats.saved_pages += len(keys)
            if self.disk is not None:
                for key, page in zip(keys, pages):
                    self.disk.put(key, page)
        except Exception as e:   # never let the thread die: these pages are recomputed when needed
            log.warning("copying KV pages to host memory failed (%s: %s): they are not offloaded",
                        type(e).__name__, e)
        finally:
            with self._lock:
                self._saving_keys.difference_update(keys)
                self.stats.lander_s += time.perf_counter() - start

    def _put(self, key: bytes, page: np.ndarray) -> None:
        """Into the LRU, evicting the oldest beyond the budget (the caller holds the lock)."""
        self._host[key] = page
        self._host.move_to_end(key)
        while len(self._host) * self.page_bytes > self.budget:
            self._host.popitem(last=False)
            self.stats.host_evictions += 1

    # ---- loading ---------------------------------------------------------------------

    def find(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are in host memory."""
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._host:
                    break
                n += 1
        return n

    def take(self, keys: Sequence[bytes], limit: int) -> list[np.ndarray | jax.Array]:
        """The pages of `keys`, from the first, that were uploaded or that host memory holds
        (at most `limit`), made the most recent in host memory: taken in one step, since the
        lander may evict meanwhile. An uploaded page is handed over (and forgotten)."""
        out: list[np.ndarray | jax.Array] = []
        with self._lock:
            for key in keys[:limit]:
                page = self._host.get(key)
                if page is not None:
                    self._host.move_to_end(key)
                uploaded = self._uploaded.pop(key, None)
                if uploaded is not None:
                    self.stats.prefetched_pages += 1
                    page = uploaded
                if page is None:
                    break
                out.append(page)
        return out

    def uploading(self, keys: Iterable[bytes]) -> bool:
        """Whether any of `keys` is still on its way to the device (queued or in flight)."""
        with self._lock:
            return not self._uploading.isdisjoint(keys)

    def queue_load(self, pages: list[int], data: list[np.ndarray | jax.Array]) -> None:
        """These fresh pages get this K/V (from `take`) before the next batch runs."""
        self._loads.append((pages, data))

    def dispatch_loads(self, cache: KVCache) -> KVCache:
        """Dispatch the queued loads (the cache is donated; use the returned one)."""
        loads, self._loads = self._loads, []
        pages = [p for ps, _ in loads for p in ps]
        if not pages:
            return cache
        start = time.perf_counter()
        data = [d for _, ds in loads for d in ds]
        self.stats.loaded_pages += len(pages)
        for i in range(0, len(pages), LOAD_CHUNK):
            cache = self._scatter_chunk(cache, pages[i:i + LOAD_CHUNK], data[i:i + LOAD_CHUNK])
        self.stats.load_s += time.perf_counter() - start
        return cache

    def _scatter_chunk(self, cache: KVCache, pages: list[int], data: list[np.ndarray | jax.Array]) -> KVCache:
        ids = _padded(pages)
        n = len(ids)
        # Pages not uploaded go to the device as they lie in host memory, one batched
        # transfer and no stacking on the engine's thread (uploaded ones stay where they
        # are); the padding is a zero page to the null page.
        sent = jax.device_put(data, cache.k.sharding)
        return self._scatter(cache, ids, (*sent, *(self._zero_page(cache),) * (n - len(pages))))

    def _zero_page(self, cache: KVCache) -> jax.Array:
        if self._zero is None:
            self._zero = jax.device_put(np.zeros((2, cache.k.shape[0], *cache.k.shape[2:]), cache.k.dtype),
                                        cache.k.sharding)
        return self._zero

    def prefetch(self, keys: Iterable[bytes]) -> None:
        """Start moving the pages of `keys` (from the first, while some tier holds them)
        towards the device: those in host memory to the uploader thread, those on disk to
        the reader thread (which uploads them as it reads them), up to `PREFETCH_BYTES`."""
        for i, key in enumerate(keys):
            with self._lock:
                known = key in self._host
                upload = i < self._max_uploaded and key not in self._uploaded and key not in self._uploading
                if upload and (known or (self.disk is not None and key in self.disk)):
                    self._uploading.add(key)   # before a thread sees it, so that `uploading` says so
                    if known:
                        self._uploads.put(key)
            if known or key in self._reading:
                continue
            if self.disk is None or key not in self.disk:
                break
            self._reading.add(key)
            self._reads.put(key)

    def _upload_from(self, key: bytes) -> None:
        """The uploader thread's work: this key and those queued behind it, one transfer."""
        self._upload(_drain(key, self._uploads), None)

    def _upload(self, keys: list[bytes], pages: list[np.ndarray | None] | None) -> None:
        """Copy these pages (or those host memory holds for `keys`) to the device, off the
        engine's thread; a key whose page is gone is simply not uploaded."""
        try:
            with self._lock:
                generation = self._generation
                if pages is None:
                    pages = [self._host.get(key) for key in keys]
            todo = [(k, p) for k, p in zip(keys, pages) if p is not None]
            sent = jax.device_put([p for _, p in todo], self._device) if todo else []
            with self._lock:
                if generation == self._generation:
                    for (key, _), page in zip(todo, sent):
                        self._uploaded[key] = page
                        self._uploaded.move_to_end(key)
                    while len(self._uploaded) > self._max_uploaded:
                        self._uploaded.popitem(last=False)
        except Exception as e:   # never let the thread die: the host copy still serves
            log.warning("uploading KV pages to the device failed (%s: %s): they load at admission instead",
                        type(e).__name__, e)
        finally:
            with self._lock:
                self._uploading.difference_update(keys)

    def _read_from(self, key: bytes) -> None:
        """The disk reader thread's work: this key and those queued behind it. Each page is
        handed to the engine as soon as it is read; those marked for upload go to the
        device together, one transfer."""
        to_upload: list[tuple[bytes, np.ndarray | None]] = []
        for k in _drain(key, self._reads):
            try:
                page = self.disk.get(k)
            except Exception as e:   # never let the thread die
                log.warning("reading a KV page from disk failed (%s: %s): it is recomputed", type(e).__name__, e)
                page = None
            with self._lock:
                if k in self._uploading:
                    to_upload.append((k, page))
            self._promoted.put((k, page))
        if to_upload:
            self._upload([k for k, _ in to_upload], [p for _, p in to_upload])

    def settle(self) -> None:
        """Wait for the queued disk reads and land everything (for tests and benchmarks; the
        engine itself never waits)."""
        self.flush()
        self._reads.join()
        self._uploads.join()
        self.land(wait=True)

    def clear(self) -> None:
        """Forget every offloaded page (host and disk)."""
        self.flush()
        self.land(wait=True)
        with self._lock:
            self._host.clear()
            self._uploaded.clear()
            self._generation += 1
        if self.disk is not None:
            self.disk.clear()


_STOP = object()


def _drain(first: bytes, jobs: queue.Queue) -> list[bytes]:
    """`first` and the keys queued behind it, up to `LOAD_CHUNK`, to handle in one go. Those
    taken here count as done at once; the thread marks `first` done after handling them
    all, so joining the queue still waits for the whole batch."""
    keys = [first]
    while len(keys) < LOAD_CHUNK and not jobs.empty():
        keys.append(jobs.get())
        jobs.task_done()
    return keys


def _start(owner: KVOffloader, jobs: queue.Queue, handle: Callable[[KVOffloader, Any], None], name: str) -> None:
    """A daemon thread that runs handle(owner, job) for each job. It holds the owner only
    while handling a job, so an offloader that is dropped (its engine with it) is freed,
    device and host pages included, and its threads end."""
    ref = weakref.ref(owner)

    def serve() -> None:
        while True:
            job = jobs.get()
            target = ref()
            try:
                if job is _STOP or target is None:
                    return
                handle(target, job)
            finally:
                job = target = None   # nothing of the owner's stays referenced while idle
                jobs.task_done()

    weakref.finalize(owner, jobs.put, _STOP)
    threading.Thread(target=serve, name=name, daemon=True).start()


def model_fingerprint(model_cfg: Any, block_size: int, dtype: Any, params: Any) -> dict[str, Any]:
    """What a stored page depends on besides its tokens: the model (its configuration and a
    hash of the first values of every weight), the page size and the cache dtype."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(jnp.ravel(leaf)[:64], np.float32).tobytes())
    return {"model": repr(model_cfg), "weights": h.hexdigest(), "block_size": block_size, "dtype": str(dtype)}


def make_offloader(cfg: Any, model_cfg: Any, runner: Any) -> KVOffloader | None:
    """The offload tiers an `EngineConfig` asks for (None: no `kv_offload_host_gb`)."""
    if cfg.kv_offload_host_gb <= 0:
        return None
    disk = None
    if cfg.kv_offload_disk_path is not None:
        disk = DiskKVStore(cfg.kv_offload_disk_path, int(cfg.kv_offload_disk_gb * 2**30),
                           model_fingerprint(model_cfg, cfg.block_size, runner.kv_dtype, runner.params),
                           dtype=runner.kv_dtype)
    page_bytes = kv_bytes_per_page(model_cfg, cfg.block_size, runner.kv_dtype)
    stage = (runner.stage_spec, runner.cache) if runner.stage_spec is not None else None
    return KVOffloader(int(cfg.kv_offload_host_gb * 2**30), page_bytes, disk, stage, device=runner.cache.k.sharding)
