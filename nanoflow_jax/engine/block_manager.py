"""Host-side page allocator for the paged KV cache: a free list and reference counts.

Pages are indices into the device pool `[L, num_pages, page_size, K, D]`. Page 0 is the
null page (padding writes land there), so it is never handed out. Reference counts let
several block tables share a page (forked or shared prefixes); a page returns to the free
list when its last holder releases it.
"""

from __future__ import annotations

import collections

from nanoflow_jax.models.paged import NULL_PAGE


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free (callers check `num_free` first)."""


class BlockManager:
    def __init__(self, num_pages: int, block_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page {NULL_PAGE} is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.block_size = block_size
        self._refcount = [0] * num_pages
        # FIFO reuse spreads writes over the pool; any order would be correct.
        self._free: collections.deque[int] = collections.deque(
            p for p in range(num_pages) if p != NULL_PAGE)

    @property
    def num_usable(self) -> int:
        """Pages a request could ever get (the pool minus the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Another block table now also holds these pages."""
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"page {p} is not allocated; cannot share it")
            self._refcount[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if p == NULL_PAGE or self._refcount[p] <= 0:
                # A double free would hand one page to two requests: fail loudly instead.
                raise ValueError(f"page {p} released but not held (double free or foreign page)")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to cover `num_tokens` tokens; False if pages lack."""
        need = self.pages_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        block_table.extend(self.allocate(need))
        return True

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def all_free(self) -> bool:
        """True when every usable page is back on the free list (the leak check)."""
        return len(self._free) == self.num_usable and not any(self._refcount)
