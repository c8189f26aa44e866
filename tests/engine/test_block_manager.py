"""The host page allocator: page 0 never handed out, refcounts, no double frees, no leaks."""

from __future__ import annotations

import pytest

from nanoflow_jax.engine.block_manager import BlockManager, OutOfPagesError
from nanoflow_jax.models.paged import NULL_PAGE


def test_allocates_every_page_but_the_null_page_once():
    bm = BlockManager(num_pages=9, block_size=4)
    pages = bm.allocate(8)
    assert sorted(pages) == list(range(1, 9)) and NULL_PAGE not in pages
    assert bm.num_free == 0
    with pytest.raises(OutOfPagesError):
        bm.allocate(1)
    bm.release(pages)
    assert bm.all_free()


def test_refcounts_keep_shared_pages_until_the_last_release():
    bm = BlockManager(num_pages=5, block_size=2)
    pages = bm.allocate(2)
    bm.share(pages)
    bm.release(pages)
    assert bm.num_free == 2 and all(bm.refcount(p) == 1 for p in pages)
    bm.release(pages)
    assert bm.all_free()
    with pytest.raises(ValueError, match="double free"):
        bm.release(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        bm.share(pages[:1])


def test_grow_covers_tokens_and_refuses_without_partial_allocation():
    bm = BlockManager(num_pages=4, block_size=4)   # 3 usable pages = 12 tokens
    table: list[int] = []
    assert bm.grow(table, 5) and len(table) == 2
    assert bm.grow(table, 8) and len(table) == 2
    assert not bm.grow(table, 13) and len(table) == 2 and bm.num_free == 1
    assert bm.grow(table, 12) and len(table) == 3
    bm.release(table)
    assert bm.all_free()


def test_pool_needs_a_real_page():
    with pytest.raises(ValueError, match="reserved"):
        BlockManager(num_pages=1, block_size=4)
