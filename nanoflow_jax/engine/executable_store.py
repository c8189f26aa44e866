"""Compiled step executables kept on disk, so that a warm start skips tracing and lowering.

JAX's persistent compilation cache saves XLA's compile, but its key is the lowered
program: every start still traces each bucket and lowers its Pallas kernels in Python,
one bucket after another under the GIL. This store keys a whole serialized executable by
everything that shapes it instead, so a start whose key matches loads it directly:

- the code: every source and table file of `nanoflow_jax` and `pallas_kernels`;
- the stack: jax and jaxlib versions, the backend, its devices' kinds and ids, $XLA_FLAGS
  and $NANOFLOW_GEMM_TABLE's file (the other NANOFLOW_* variables change no kernel);
- the run: the model and engine configurations, the kernel set, the pipeline and its SM
  budgets, the parameters' and the KV pool's shapes, dtypes and shardings;
- the job: the bucket (T, W, decode_only) or the sampler (S, plan).

Entries are written atomically (a temporary file, then a rename). An entry that fails to
load is dropped with a warning and compiled again. Each code version or configuration
writes its own entries, so the folder keeps to `max_bytes` (default 4 GiB): after a write,
the least recently used entries go first (a load counts as a use). Loading runs the pickled executable:
like JAX's own cache, the folder must be trusted.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

import jax
from jax.experimental import serialize_executable

from nanoflow_jax import env

log = logging.getLogger(__name__)

_PACKAGES = ("nanoflow_jax", "pallas_kernels")
_CODE_SUFFIXES = (".py", ".json")
DEFAULT_MAX_BYTES = 4 << 30
_warned = False   # a store failure was logged as a warning in this process


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every source and table file of the packages the step runs (once a process)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in _CODE_SUFFIXES and path.is_file():
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def _avals(tree: Any) -> str:
    """Shapes, dtypes and shardings of a pytree's leaves, with its structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts = [str(treedef)]
    for leaf in leaves:
        parts.append(f"{getattr(leaf, 'shape', None)}:{getattr(leaf, 'dtype', type(leaf).__name__)}:"
                     f"{getattr(leaf, 'sharding', None)}")
    return "|".join(parts)


def _gemm_table() -> str:
    """$NANOFLOW_GEMM_TABLE and its contents: the one setting of the environment that
    changes the compiled kernels (the GEMM tiles)."""
    path = env.gemm_table()
    if not path:
        return ""
    try:
        return f"{path}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"
    except OSError:
        return path


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_fingerprint(*, model_cfg: Any, engine_cfg: Any, params: Any, cache: Any, extra: Iterable[Any]) -> str:
    """A hash of the stack and the run: what the executables of one engine share."""
    devices = jax.devices()
    parts = [code_fingerprint(), jax.__version__, _jaxlib_version(), jax.default_backend(),
             [(d.id, d.device_kind) for d in devices], os.environ.get("XLA_FLAGS", ""),
             _gemm_table(), repr(model_cfg), repr(engine_cfg), _avals(params), _avals(cache), *map(repr, extra)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class ExecutableStore:
    """Serialized `jax.stages.Compiled` objects in one folder, one file per job."""

    def __init__(self, folder: str | os.PathLike[str], fingerprint: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 devices: Sequence[Any] | None = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        # The devices the executables run on: loading onto all of the backend's would make
        # a one-device step expect one shard per device of the host.
        self.devices = list(devices) if devices is not None else jax.devices()[:1]
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.stored = 0   # entries this process wrote

    def _path(self, job: Hashable) -> Path:
        digest = hashlib.sha256(f"{self.fingerprint}|{job!r}".encode()).hexdigest()
        return self.folder / f"{digest}.exe"

    def load(self, job: Hashable) -> Any | None:
        """The stored executable of `job`, or None (not stored, or unreadable: dropped)."""
        path = self._path(job)
        try:
            blob = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(blob)
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=self.devices)
        except Exception as exc:  # noqa: BLE001 - a bad entry costs a compile, never the start
            log.warning("dropping the stored executable %s (%s: %s); compiling it again", path.name,
                        type(exc).__name__, exc)
            _remove(path)
            self.misses += 1
            return None
        self.hits += 1
        try:
            os.utime(path)   # recently used: pruned last
        except OSError:
            pass
        return compiled

    def store(self, job: Hashable, compiled: Any) -> None:
        """Writes `compiled` for `job`; a failure (no space, no serialization) only warns."""
        path = self._path(job)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            self.stored += 1
            self.prune(keep=path)
        except Exception as exc:  # noqa: BLE001 - the engine runs on without the entry
            _remove(tmp)
            # Once a process: some executables cannot serialize (XLA:CPU's sort comparator
            # when JAX's own cache supplied the executable) and would warn at every start.
            global _warned
            level = logging.DEBUG if _warned else logging.WARNING
            _warned = True
            log.log(level, "could not store the executable of %r in %s (%s: %s); it compiles at every start",
                    job, self.folder, type(exc).__name__, exc)

    def prune(self, keep: Path | None = None) -> None:
        """Deletes the least recently used entries until the folder holds `max_bytes`."""
        entries = []
        for entry in self.folder.glob("*.exe"):
            try:
                st = entry.stat()
            except OSError:   # removed meanwhile (another engine pruning)
                continue
            entries.append((st.st_mtime, st.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                _remove(entry)
                total -= size

