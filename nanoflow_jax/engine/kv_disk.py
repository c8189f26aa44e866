"""Tier 2 of the KV offload: cached pages on disk, written by a background thread.

One file per page (`<key hex>.npy`: the page's keys and values, [2, L, page_size, K, D]),
named by its prefix-cache key. A write goes to a temporary file that is renamed into place
(`os.replace`), so a crash never leaves half a page under a real name; its sha256 goes into
`manifest.json` (itself replaced atomically, at most every `MANIFEST_INTERVAL_S` while pages
stream in, on `flush` and once the writer goes idle), which the next engine over the same
folder reads back; page files the manifest does not list are deleted then. The manifest
also records the model's fingerprint: a folder written by another model (or page layout)
is not served. A read checks the size and the checksum: a truncated
or corrupt page is dropped (and recomputed by the caller), never served.

Nothing here raises into the engine: a full disk or an unwritable folder logs a warning
and the page is skipped. The LRU budget counts file bytes; the least recently used pages'
files are deleted when a write would exceed it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The manifest lists every page: rewriting it after each burst of pages would hold the GIL
# (json of thousands of entries) beside the engine's thread; its lag is bounded instead.
MANIFEST_INTERVAL_S = 1.0
_STOP = object()
_PAGE_FILE = re.compile(r"([0-9a-f]+)\.npy(\.tmp)?")   # <key hex>.npy, and its temporary


def npy_parts(page: np.ndarray) -> tuple[bytes, memoryview]:
    """The bytes of `page`'s .npy file (what `np.save` writes) as its header and a view of the
    page's own memory: hashing and writing a view copy nothing and let go of the GIL."""
    page = np.ascontiguousarray(page)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(page))
    return header.getvalue(), memoryview(page.reshape(-1).view(np.uint8))


def write_parts(path: Path, parts: tuple[bytes, memoryview]) -> str:
    """Write `npy_parts` to `path`, hashing them as they go; returns the sha256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in parts:
            digest.update(part)
            f.write(part)
    return digest.hexdigest()


class DiskKVStore:
    def __init__(self, path: str | os.PathLike[str], budget_bytes: int, fingerprint: dict[str, Any],
                 max_queued: int = 4096, dtype: Any = None) -> None:
        self.path = Path(path).expanduser()
        # .npy has no bfloat16: such pages load as raw 2-byte voids and are viewed back.
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.budget = int(budget_bytes)
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()  # LRU first
        # Bounded: a disk slower than the evictions skips pages rather than hoard memory.
        self._queue: queue.Queue[Any] = queue.Queue(max_queued)
        self._warned: set[str] = set()
        self._manifest_lock = threading.Lock()   # the writer thread and `flush` both save it
        self._dirty = False
        self._saved_at = time.monotonic()
        self.bytes_used = 0
        self.pages_written = self.pages_read = self.corrupt = self.write_errors = self.skipped = 0
        self.usable = self._open()
        self._thread = threading.Thread(target=self._writer, name="kv-disk-writer", daemon=True)
        self._thread.start()

    # ---- set-up ---------------------------------------------------------------------

    def _open(self) -> bool:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._warn("open", f"KV offload folder {self.path} is not writable ({e}): the disk tier is off")
            return False
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            return True
        except (OSError, ValueError) as e:
            self._warn("manifest", f"{self.path / MANIFEST} is unreadable ({e}): starting the disk tier empty")
            return True
        if manifest.get("fingerprint") != self.fingerprint:
            log.warning("%s holds KV pages of another model or page layout: they are not served, and are "
                        "replaced as new pages are written", self.path)
            self._remove_unlisted()
            return True
        for name, entry in manifest.get("entries", {}).items():
            if (self.path / f"{name}.npy").is_file():
                self._entries[name] = entry
                self.bytes_used += int(entry["bytes"])
        self._remove_unlisted()
        return True

    def _remove_unlisted(self) -> None:
        """Page files the manifest does not list (written after its last save, or half-written
        before a crash) would hold disk space outside the budget: they go."""
        for f in self.path.iterdir():
            m = _PAGE_FILE.fullmatch(f.name)
            if m and m.group(1) not in self._entries:
                self._unlink_path(f)

    # ---- the engine's side (main thread) --------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key.hex() in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: bytes, page: np.ndarray) -> None:
        """Queue one page for writing; returns at once."""
        if not self.usable:
            return
        try:
            self._queue.put_nowait((key.hex(), page))
        except queue.Full:
            self.skipped += 1
            self._warn("behind", f"the KV disk writer is {self._queue.maxsize} pages behind: pages are skipped "
                                 "until it catches up")

    def get(self, key: bytes) -> np.ndarray | None:
        """The page, or None when absent, truncated or corrupt (a bad file is dropped)."""
        name = key.hex()
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            self._entries.move_to_end(name)
        try:
            data = (self.path / f"{name}.npy").read_bytes()
        except FileNotFoundError:   # evicted by the writer meanwhile
            return None
        except OSError as e:
            self._drop(name, f"unreadable ({e})")
            return None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self._drop(name, "truncated or corrupt (size or sha256 differ from the manifest)")
            return None
        self.pages_read += 1
        page = np.load(io.BytesIO(data), allow_pickle=False)
        return page if self.dtype is None or page.dtype == self.dtype else page.view(self.dtype)

    def flush(self) -> None:
        """Wait until every queued page is written (or skipped) and listed in the manifest."""
        self._queue.join()
        if self._dirty:
            self._save_manifest()

    def clear(self) -> None:
        self.flush()
        with self._lock:
            names = list(self._entries)
            self._entries.clear()
            self.bytes_used = 0
        for name in names:
            self._unlink(name)
        self._save_manifest()

    def close(self) -> None:
        self.flush()
        self._queue.put(_STOP)   # blocks only while the queue is full
        self._thread.join()

    # ---- the writer thread ----------------------------------------------------------

    def _writer(self) -> None:
        while True:
            try:   # idle with unsaved pages: save the manifest once the interval passes
                item = self._queue.get(timeout=MANIFEST_INTERVAL_S if self._dirty else None)
            except queue.Empty:
                self._save_manifest()
                continue
            try:
                if item is _STOP:
                    if self._dirty:
                        self._save_manifest()
                    return
                self._write(*item)
                if self._dirty and time.monotonic() - self._saved_at >= MANIFEST_INTERVAL_S:
                    self._save_manifest()
            except Exception as e:   # never let the thread die: the engine keeps serving
                self._warn("writer", f"the KV disk writer failed ({type(e).__name__}: {e}); pages are skipped")
            finally:
                self._queue.task_done()

    def _write(self, name: str, page: np.ndarray) -> None:
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return
        parts = npy_parts(page)
        size = sum(len(p) for p in parts)
        if size > self.budget:
            return
        self._make_room(size)
        tmp = self.path / f"{name}.npy.tmp"
        try:
            sha256 = write_parts(tmp, parts)
            os.replace(tmp, self.path / f"{name}.npy")
        except OSError as e:
            self.write_errors += 1
            self._warn("write", f"writing KV pages to {self.path} failed ({e}): those pages are skipped "
                                "(they are recomputed when needed)")
            self._unlink_path(tmp)
            return
        with self._lock:
            self._entries[name] = {"sha256": sha256, "bytes": size}
            self.bytes_used += size
            self._dirty = True
        self.pages_written += 1

    def _make_room(self, nbytes: int) -> None:
        while True:
            with self._lock:
                if not self._entries or self.bytes_used + nbytes <= self.budget:
                    return
                name, entry = self._entries.popitem(last=False)
                self.bytes_used -= int(entry["bytes"])
                self._dirty = True
            self._unlink(name)

    def _save_manifest(self) -> None:
        with self._manifest_lock:
            with self._lock:
                manifest = {"fingerprint": self.fingerprint, "entries": dict(self._entries)}
                self._dirty = False
            self._saved_at = time.monotonic()
            tmp = self.path / f"{MANIFEST}.tmp"
            try:
                tmp.write_text(json.dumps(manifest))
                os.replace(tmp, self.path / MANIFEST)
            except OSError as e:
                self._unlink_path(tmp)
                self._warn("manifest-write", f"writing {self.path / MANIFEST} failed ({e}): the disk tier will not "
                                             "survive a restart")

    # ---- helpers ----------------------------------------------------------------------

    def _drop(self, name: str, why: str) -> None:
        self.corrupt += 1
        log.warning("KV page %s in %s is %s: dropped, it is recomputed", name[:12], self.path, why)
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self.bytes_used -= int(entry["bytes"])
                self._dirty = True
        self._unlink(name)

    def _unlink(self, name: str) -> None:
        self._unlink_path(self.path / f"{name}.npy")

    @staticmethod
    def _unlink_path(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:   # once per kind: a full disk would flood the log
            self._warned.add(kind)
            log.warning("%s", message)
