"""The offload save path's staging ring: device-to-host copies that run inside the step.

A page to offload is first copied, device to device, into a slot of a small ring of
staging pages (one cheap jitted scatter dispatched before the next batch, after which the
pool's page may be reused at once). Each iteration's jitted step then sends one window of
the ring (`StageSpec.window` pages) to pinned host memory as an extra output: the copy is
part of the step's program (XLA's copy-start / copy-done), so it runs beside the step's
kernels instead of holding up the stream. The host reads a window once its step is done
and frees it for refilling. A step with nothing to send still copies one window (its
output is ignored): it keeps one executable per bucket, so the window is kept small.

Sizing: a window is `WINDOW_BYTES` of pages (at most `MAX_WINDOW_PAGES`), and the ring holds
`RING_WINDOWS` windows; pages that find the ring full take the direct path of
`kv_offload` (a gather into pinned memory dispatched before the batch, which stalls it).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.models.paged import NULL_PAGE, KVCache

# Per step, idle or not. Small: on an H100, 128 MiB windows cost small-batch single-round work a
# third of its throughput, 16 MiB windows no more than the direct gather (bench/RESULTS.md).
WINDOW_BYTES = 16 << 20
MAX_WINDOW_PAGES = 256
RING_WINDOWS = 4


@dataclasses.dataclass(frozen=True)
class StageSpec:
    window: int       # pages sent to the host by each step
    windows: int      # windows in the ring

    @property
    def slots(self) -> int:
        return self.window * self.windows


def stage_spec(pages_per_step: int | None, page_bytes: int) -> StageSpec | None:
    """The ring for `kv_offload_pages_per_step` pages a step (None: by WINDOW_BYTES; 0: no ring)."""
    if pages_per_step == 0:
        return None
    window = pages_per_step or min(MAX_WINDOW_PAGES, max(1, WINDOW_BYTES // page_bytes))
    return StageSpec(window, RING_WINDOWS)


def stage_struct(spec: StageSpec, cache: Any) -> jax.ShapeDtypeStruct:
    """The ring's shape: [2 (K, V), layers, slots, page size, KV heads, head dim]."""
    layers, _, *page = cache.k.shape
    return jax.ShapeDtypeStruct((2, layers, spec.slots, *page), cache.k.dtype)


def send_window(stage: jax.Array, index: jax.Array, window: int, host: Any) -> jax.Array:
    """Traced inside the step: window `index` of the ring, placed in host memory."""
    out = jax.lax.dynamic_slice_in_dim(stage, index * window, window, axis=2)
    return jax.device_put(out, host) if host is not None else out


def stack_pages(cache: KVCache, ids: jax.Array) -> jax.Array:
    """The K/V of pages `ids` as one buffer [2, L, n, ps, K, D] (the offload tiers' layout)."""
    return jnp.stack([cache.k[:, ids], cache.v[:, ids]])


def _fill(stage: jax.Array, cache: KVCache, ids: jax.Array, slots: jax.Array) -> jax.Array:
    # Padding rows carry slot = stage size: dropped, not written.
    return stage.at[:, :, slots].set(stack_pages(cache, ids), mode="drop")


@dataclasses.dataclass
class Send:
    """What one step sends: the ring, the window index, and where its output goes."""
    stage: jax.Array
    index: int
    on_sent: Callable[[jax.Array], None]


class StageRing:
    """Windows cycle free -> filling -> queued -> sent -> free (landed); one step sends one."""

    def __init__(self, spec: StageSpec, cache: KVCache, host: Any) -> None:
        self.spec, self.host = spec, host   # host: the pinned-memory sharding (None: stay on device)
        struct = stage_struct(spec, cache)
        self.stage = jnp.zeros(struct.shape, struct.dtype, device=cache.k.sharding)   # committed, as the cache
        self._fill = jax.jit(_fill, donate_argnums=0)
        self._send = jax.jit(send_window, static_argnums=(2, 3))
        self._free = collections.deque(range(spec.windows))
        self._filling: tuple[int, list[bytes]] | None = None
        self._queued: collections.deque[tuple[int, list[bytes]]] = collections.deque()
        self._sent: collections.deque[tuple[int, list[bytes], jax.Array]] = collections.deque()
        self._unsent: tuple[int, list[bytes]] | None = None   # handed to a step not yet dispatched

    def warm_up(self, cache: KVCache) -> None:
        """Compile the fill for every page-count bucket it can take."""
        n = 1
        while True:
            size = min(n, self.spec.slots)   # as `fill` pads: a power of two, at most the ring
            self.stage = self._fill(self.stage, cache, np.full(size, NULL_PAGE, np.int32),
                                    np.full(size, self.spec.slots, np.int32))
            if n >= self.spec.slots:
                break
            n *= 2
        jax.block_until_ready(self._send(self.stage, np.int32(0), self.spec.window, self.host))

    def fill(self, cache: KVCache, pages: Sequence[tuple[int, bytes]], bucket: Callable[[int], int]) -> int:
        """Copy as many of these (page, key) pairs as the ring has room for into it; returns
        how many it took (from the first)."""
        ids: list[int] = []
        slots: list[int] = []
        w = self.spec.window
        for page, key in pages:
            if self._filling is None:
                if not self._free:
                    break
                self._filling = (self._free.popleft(), [])
            index, keys = self._filling
            slots.append(index * w + len(keys))
            ids.append(page)
            keys.append(key)
            if len(keys) == w:
                self._queued.append(self._filling)
                self._filling = None
        if ids:
            n = min(bucket(len(ids)), self.spec.slots)   # one fill never exceeds the ring
            pad_ids = np.full(n, NULL_PAGE, np.int32)
            pad_slots = np.full(n, self.spec.slots, np.int32)
            pad_ids[:len(ids)], pad_slots[:len(ids)] = ids, slots
            self.stage = self._fill(self.stage, cache, pad_ids, pad_slots)
        return len(ids)

    def next_send(self) -> Send:
        """The window the next step sends: the oldest queued one, else the one filling
        (closed now), else an idle send whose output is dropped. A window whose step never
        dispatched (it raised) goes out again first."""
        if self._unsent is not None:
            self._queued.appendleft(self._unsent)
            self._unsent = None
        if not self._queued and self._filling is not None and self._filling[1]:
            self._queued.append(self._filling)
            self._filling = None
        if not self._queued:
            return Send(self.stage, 0, lambda out: None)
        self._unsent = self._queued.popleft()
        return Send(self.stage, self._unsent[0], self._delivered)

    def _delivered(self, out: jax.Array) -> None:
        index, keys = self._unsent
        self._unsent = None
        self._sent.append((index, keys, out))

    def flush(self) -> None:
        """Send every staged window now, each by its own small executable (no step is
        coming: the engine is going idle)."""
        while True:
            send = self.next_send()
            if self._unsent is None:
                return
            send.on_sent(self._send(send.stage, np.int32(send.index), self.spec.window, self.host))

    def land(self, wait: bool = False) -> list[tuple[list[bytes], jax.Array]]:
        """Windows whose step is done (all of them with `wait`), as (keys, the window in
        host memory). Their slots are free again: a fill dispatched from now on runs after
        the steps that read them, in the device's stream order."""
        out = []
        while self._sent and (wait or self._sent[0][2].is_ready()):
            index, keys, buf = self._sent.popleft()
            out.append((keys, buf))
            self._free.append(index)
        return out
