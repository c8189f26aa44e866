"""Automatic prefix caching (vLLM's APC): full KV pages found again by the tokens they hold.

A full page is keyed by a chained hash: blake2b of its parent page's key and its own
token ids. So one key names the page's tokens and every token before them, and a request
finds the longest cached page-aligned prefix of its prompt by walking its keys from the
start. The keys depend on token ids alone, so they are the same in every process (a
later tier can name stored pages by them).

`PrefixCache` is the index the `BlockManager` consults: key <-> page for pages whose K/V
is complete, and an LRU of cached pages no request holds (refcount 0). Those pages count
as free: the allocator reclaims the least recently used one (dropping its key) before it
reports running out, so a cached page never causes a preemption.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Callable, Sequence

import numpy as np

ROOT_KEY = b""   # the parent key of a request's first page


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The chained key of one full page: its parent's key and its token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


def extend_keys(keys: list[bytes], num_pages: int, block_size: int,
                tokens: Callable[[int, int], Sequence[int]]) -> list[bytes]:
    """`keys` (a request's page keys so far) grown to `num_pages` keys: a new list when it
    grows, so requests forked from one another may share the list they started with.

    `tokens(start, end)` returns the token ids at positions [start, end); every page asked
    for must be full and known."""
    if len(keys) >= num_pages:
        return keys
    keys = list(keys)
    while len(keys) < num_pages:
        i = len(keys)
        keys.append(page_key(keys[-1] if i else ROOT_KEY, tokens(i * block_size, (i + 1) * block_size)))
    return keys


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters since start-up (or the last reset of the counters): vLLM's names."""

    requests: int = 0    # admissions that looked up the cache
    queries: int = 0     # tokens those admissions asked for
    hits: int = 0        # of which found in cached pages (not computed)
    evictions: int = 0   # cached pages reclaimed for new K/V

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class PrefixCache:
    """Key <-> page index of complete pages, and the LRU of those no request holds."""

    def __init__(self) -> None:
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # Cached pages with refcount 0, least recently released first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.stats = PrefixCacheStats()

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def key_of(self, page: int) -> bytes | None:
        return self._key_of.get(page)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Pages of the longest prefix of `keys` that is cached."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, page: int, key: bytes) -> bool:
        """Name a held page whose K/V is complete. False (nothing changes) when the page
        already has a key or another page holds these tokens (two requests computed the
        same prefix at once: the later copy stays private and is freed as usual)."""
        if page in self._key_of or key in self._page_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def park(self, page: int) -> bool:
        """The last holder released `page`: keep it as an evictable cached page if it is
        cached (True); False means it goes back to the free list."""
        if page not in self._key_of:
            return False
        self._evictable[page] = None
        return True

    def take(self, page: int) -> None:
        """A request maps an evictable cached page again."""
        del self._evictable[page]

    def evict(self) -> tuple[int, bytes]:
        """Reclaim the least recently released cached page: (page, the key it had)."""
        page, _ = self._evictable.popitem(last=False)
        key = self._key_of.pop(page)
        del self._page_of[key]
        self.stats.evictions += 1
        return page, key

    def reset(self) -> list[int]:
        """Forget every key; returns the evictable pages, now plain free pages. Pages in
        use stay with their holders and are freed normally."""
        freed = list(self._evictable)
        self._evictable.clear()
        self._page_of.clear()
        self._key_of.clear()
        return freed
