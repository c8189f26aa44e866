"""The disk tier alone: atomic checksummed pages, a manifest that survives a restart, an LRU
budget, and every failure (corrupt, truncated, unwritable, full disk) survived."""

from __future__ import annotations

import errno
import json
import logging
import time

import numpy as np
import pytest

from nanoflow_jax.engine import kv_disk
from nanoflow_jax.engine.kv_disk import MANIFEST, DiskKVStore
from nanoflow_jax.engine.prefix_cache import page_key

FP = {"model": "tiny", "weights": "abc", "block_size": 4, "dtype": "float32"}


def pages(n: int, seed: int = 0) -> list[tuple[bytes, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(page_key(b"", [seed, i]), rng.standard_normal((2, 2, 4, 2, 16)).astype(np.float32)) for i in range(n)]


def store(path, budget: int = 1 << 20, fp: dict = FP) -> DiskKVStore:
    return DiskKVStore(path, budget, fp)


def written(s: DiskKVStore, items: list[tuple[bytes, np.ndarray]]) -> DiskKVStore:
    for k, p in items:
        s.put(k, p)
    s.flush()
    return s


def test_pages_round_trip_and_survive_a_restart(tmp_path):
    items = pages(5)
    s = written(store(tmp_path), items)
    assert len(s) == 5 and s.pages_written == 5
    for k, p in items:
        np.testing.assert_array_equal(s.get(k), p)
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"
    s.close()
    again = store(tmp_path)
    assert len(again) == 5 and again.bytes_used == s.bytes_used
    for k, p in items:
        np.testing.assert_array_equal(again.get(k), p)
    assert again.get(page_key(b"", [9])) is None
    # Another model's folder: nothing is served, and its files go.
    other = store(tmp_path, fp={**FP, "weights": "different"})
    assert len(other) == 0 and all(other.get(k) is None for k, _ in items)
    assert not list(tmp_path.glob("*.npy"))


def test_the_manifest_follows_the_writes_and_unlisted_files_go_at_open(tmp_path, monkeypatch):
    monkeypatch.setattr(kv_disk, "MANIFEST_INTERVAL_S", 0.05)
    items = pages(4, seed=int(np.random.default_rng().integers(1 << 20)))
    s = store(tmp_path)
    for k, p in items:
        s.put(k, p)
    s._queue.join()   # written, not flushed: the idle writer lists them once the interval passes
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = json.loads((tmp_path / MANIFEST).read_text())["entries"] if (tmp_path / MANIFEST).exists() else {}
        if len(listed) == 4:
            break
        time.sleep(0.02)
    assert set(listed) == {k.hex() for k, _ in items}
    # A page file the manifest does not list (written after its last save, say) and a
    # half-written one: a restart deletes both and keeps what is listed, and any other file.
    stray, half = tmp_path / f"{'ab' * 16}.npy", tmp_path / f"{'cd' * 16}.npy.tmp"
    np.save(stray, items[0][1])
    half.write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    again = store(tmp_path)
    assert len(again) == 4 and not stray.exists() and not half.exists() and (tmp_path / "notes.txt").exists()
    for k, p in items:
        np.testing.assert_array_equal(again.get(k), p)


def test_page_files_are_what_np_save_writes():
    import io

    import ml_dtypes

    for dtype in (np.float32, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        page = np.random.default_rng().standard_normal((2, 3, 4, 2, 8)).astype(dtype)
        want = io.BytesIO()
        np.save(want, page, allow_pickle=False)
        header, data = kv_disk.npy_parts(page)
        assert header + bytes(data) == want.getvalue()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_page_is_dropped_never_served(tmp_path, damage, caplog):
    items = pages(3)
    s = written(store(tmp_path), items)
    f = tmp_path / f"{items[1][0].hex()}.npy"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert s.get(items[1][0]) is None
    assert "corrupt" in caplog.text and s.corrupt == 1
    assert items[1][0] not in s and not f.exists()
    np.testing.assert_array_equal(s.get(items[0][0]), items[0][1])
    # The manifest written next no longer lists it; a restart does not serve it either.
    s.put(*pages(1, seed=1)[0])
    s.flush()
    names = json.loads((tmp_path / MANIFEST).read_text())["entries"]
    assert items[1][0].hex() not in names and len(names) == 3


def test_lru_budget_deletes_the_least_recently_used_pages(tmp_path):
    items = pages(5)
    one = len(written(store(tmp_path / "probe"), items[:1]).path.joinpath(f"{items[0][0].hex()}.npy").read_bytes())
    s = written(store(tmp_path / "lru", budget=3 * one), items[:3])
    assert s.get(items[0][0]) is not None            # page 0 becomes the most recently used
    written(s, items[3:])
    kept = [k in s for k, _ in items]
    assert kept == [True, False, False, True, True] and s.bytes_used <= 3 * one
    assert len(list((tmp_path / "lru").glob("*.npy"))) == 3


def test_unwritable_folder_and_full_disk_warn_and_skip(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        s = store(blocker / "sub")
    assert not s.usable and "not writable" in caplog.text
    written(s, pages(2))                             # no error, nothing stored
    assert len(s) == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    s = store(tmp_path / "full")
    monkeypatch.setattr(kv_disk.os, "replace", full)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        written(s, pages(3))
    assert s.write_errors == 3 and len(s) == 0 and "No space left" in caplog.text
    assert caplog.text.count("writing KV pages") == 1, "one warning, not one per page"
    assert not list((tmp_path / "full").glob("*.tmp"))
    monkeypatch.undo()
    written(s, pages(2, seed=3))                     # the writer thread is still alive
    assert len(s) == 2


def test_bfloat16_pages_come_back_as_bfloat16(tmp_path):
    import ml_dtypes

    key, page = pages(1)[0]
    bf16 = page.astype(ml_dtypes.bfloat16)
    s = written(DiskKVStore(tmp_path, 1 << 20, FP, dtype=ml_dtypes.bfloat16), [(key, bf16)])
    got = s.get(key)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), bf16.astype(np.float32))
