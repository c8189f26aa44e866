"""Compiles the step buckets: lowered one after another, compiled by a pool of threads.

Tracing and lowering run Python and hold the GIL, so they stay in the calling thread;
XLA's compilation releases the GIL, so the compiles of different buckets overlap with
each other and with the lowering of the next bucket.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


class BucketCompileError(RuntimeError):
    """One bucket failed to lower or compile; `key` names it, `__cause__` says why."""

    def __init__(self, key: Hashable, label: str, cause: BaseException) -> None:
        super().__init__(f"compiling the step for {label} failed: {type(cause).__name__}: {cause}")
        self.key = key


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, num_jobs: int) -> int:
    """Compile threads: `workers`, else one per bucket up to the available cores."""
    if workers is None:
        workers = available_cores()
    return max(1, min(workers, num_jobs))


def compile_all(keys: Sequence[K], lower: Callable[[K], Any], options: dict[str, Any] | None,
                workers: int, label: Callable[[K], str] = str,
                on_done: Callable[[K], None] | None = None) -> dict[K, Any]:
    """Compile `lower(key)` for every key with `options`; `on_done(key)` as each finishes.

    `workers` 1 compiles in the calling thread, one bucket after another. Otherwise the
    first failure (of a lowering or a compile) cancels the compiles not yet started,
    waits for those running and raises `BucketCompileError` naming its bucket: no
    compile thread outlives the call.
    """
    done: dict[K, Any] = {}
    if workers <= 1:
        for key in keys:
            try:
                done[key] = lower(key).compile(options)
            except Exception as exc:
                raise BucketCompileError(key, label(key), exc) from exc
            if on_done is not None:
                on_done(key)
        return done

    pending: dict[Future[Any], K] = {}

    def collect(block: bool) -> None:
        # Finished compiles are taken as they come, so progress shows while lowering goes on.
        finished, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            key = pending.pop(future)
            try:
                done[key] = future.result()
            except Exception as exc:
                raise BucketCompileError(key, label(key), exc) from exc
            if on_done is not None:
                on_done(key)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nanoflow-compile")
    try:
        for key in keys:
            try:
                lowered = lower(key)
            except Exception as exc:
                raise BucketCompileError(key, label(key), exc) from exc
            pending[pool.submit(lowered.compile, options)] = key
            collect(block=False)
        while pending:
            collect(block=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done
