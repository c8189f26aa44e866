"""Host-side page allocator for the paged KV cache: a free list and reference counts.

Pages are indices into the device pool `[L, num_pages, page_size, K, D]`. Page 0 is the
null page (padding writes land there), so it is never handed out. Reference counts let
several block tables share a page (forked or shared prefixes); a page returns to the free
list when its last holder releases it.

With prefix caching on (`engine.prefix_cache`), a released page whose K/V is complete and
named by a key stays cached instead: evictable, counted in `num_free`, and reclaimed
(least recently released first) only when the free list is empty.
"""

from __future__ import annotations

import collections

from nanoflow_jax.engine.prefix_cache import PrefixCache
from nanoflow_jax.models.paged import NULL_PAGE


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free (callers check `num_free` first)."""


class BlockManager:
    def __init__(self, num_pages: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page {NULL_PAGE} is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.block_size = block_size
        self._refcount = [0] * num_pages
        # FIFO reuse spreads writes over the pool; any order would be correct.
        self._free: collections.deque[int] = collections.deque(
            p for p in range(num_pages) if p != NULL_PAGE)
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        # (page, key) of cached pages reclaimed since the engine last took them (to offload
        # their K/V before the batch that overwrites them); kept only when asked for.
        self.record_evictions = False
        self.offload_pending: list[tuple[int, bytes]] = []

    @property
    def num_usable(self) -> int:
        """Pages a request could ever get (the pool minus the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: the free list and the evictable cached pages."""
        return len(self._free) + (self.prefix_cache.num_evictable if self.prefix_cache else 0)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPagesError(f"need {n} pages, {self.num_free} free")
        pages = [self._free.popleft() if self._free else self._evict() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def _evict(self) -> int:
        page, key = self.prefix_cache.evict()
        if self.record_evictions:
            self.offload_pending.append((page, key))
        return page

    def share(self, pages: list[int]) -> None:
        """Another block table now also holds these pages."""
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"page {p} is not allocated; cannot share it")
            self._refcount[p] += 1

    def release(self, pages: list[int]) -> None:
        # Last page first: among one request's cached pages the deepest is evicted first,
        # the shared start (a system prompt) last.
        for p in reversed(pages):
            if p == NULL_PAGE or self._refcount[p] <= 0:
                # A double free would hand one page to two requests: fail loudly instead.
                raise ValueError(f"page {p} released but not held (double free or foreign page)")
            self._refcount[p] -= 1
            if self._refcount[p] == 0 and not (self.prefix_cache and self.prefix_cache.park(p)):
                self._free.append(p)

    def match_prefix(self, keys: list[bytes]) -> list[int]:
        """Hold the cached pages of the longest cached prefix of `keys` (page keys in order)."""
        if self.prefix_cache is None:
            return []
        pages = self.prefix_cache.lookup(keys)
        for p in pages:
            if self._refcount[p] == 0:
                self.prefix_cache.take(p)
            self._refcount[p] += 1
        return pages

    def cache_page(self, page: int, key: bytes) -> None:
        """`page` (held) now holds complete K/V for `key`: later requests may map it."""
        if self._refcount[page] <= 0:
            raise ValueError(f"page {page} is not allocated; cannot cache it")
        if self.prefix_cache is not None:
            self.prefix_cache.insert(page, key)

    def reset_prefix_cache(self) -> int:
        """Forget every cached page (evictable ones return to the free list); returns how many
        pages were cached."""
        if self.prefix_cache is None:
            return 0
        n = self.prefix_cache.num_cached
        self._free.extend(self.prefix_cache.reset())
        return n

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to cover `num_tokens` tokens; False if pages lack."""
        need = self.pages_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        block_table.extend(self.allocate(need))
        return True

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def all_free(self) -> bool:
        """True when no page is held and every usable page is free or evictable-cached (the leak check)."""
        return self.num_free == self.num_usable and not any(self._refcount)
