"""Iteration-level scheduler: one dense batch per iteration under a token budget.

Order inside a batch (the layout `forward_paged` expects): running decodes first, then
prefill chunks (running requests part-way through their prompt, then waiting requests in
arrival order). A prompt longer than the remaining budget is cut into chunks that span
iterations. Pages are reserved as rows are formed; when the pool runs dry the newest
running request is preempted (pages freed, recomputed later) so the oldest always makes
progress. Nothing is admitted in an iteration that had to preempt, which stops a freshly
preempted request from bouncing straight back in.

Prefix caching (when the BlockManager has a cache): an admitted request first maps the
cached pages of its longest cached page-aligned prefix (never all of its tokens: the last
one is computed, to sample from) and prefills only the rest. A page is offered to the
cache once the batch that completes its K/V is dispatched (`commit`), so a later batch,
which the device runs after it, may read it.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

from nanoflow_jax.engine.block_manager import BlockManager
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.kv_offload import KVOffloader
from nanoflow_jax.engine.prefix_cache import extend_keys
from nanoflow_jax.engine.sequence import Sequence, Status


@dataclasses.dataclass
class ScheduledRow:
    seq: Sequence
    start: int        # first position fed this iteration
    length: int       # tokens fed (1 for a decode)
    gather_row: int   # >= 0: the input token is row `gather_row` of the in-flight output
    samples: bool     # the sample at its last token is the request's next output token


@dataclasses.dataclass
class ScheduledBatch:
    rows: list[ScheduledRow]
    num_decode: int
    num_tokens: int
    num_preempted: int
    num_read: int = 0   # rows whose sampled token the engine has read back


class ScheduleError(RuntimeError):
    """Forming a batch failed on one request; every row formed before it is intact."""

    def __init__(self, seq: Sequence, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seq = seq
        self.cause = cause


class _blame:
    """Re-raises an error while scheduling `seq` as a ScheduleError naming it. A class, not
    a contextlib generator: it wraps every row of every batch, on the host's critical path."""

    __slots__ = ("seq",)

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool:
        if isinstance(error, Exception):
            raise ScheduleError(self.seq, error) from error
        return False


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: list[Sequence] = []   # sorted by arrival
        self.running: list[Sequence] = []   # sorted by arrival; these hold pages
        self.num_preemptions = 0
        self.offload: KVOffloader | None = None   # set by the engine when pages offload to host memory

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Retire a request (done, aborted): its pages go back at once.

        Freeing pages an in-flight iteration still writes is safe: every later iteration
        runs after it on the device, so a new owner's writes land afterwards.
        """
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if seq.block_table:
            if reason != "error":   # a failed step may have left its pages' K/V incomplete
                self._cache_pages(seq)
                if self.offload is not None:   # copied to host memory before any batch reuses them
                    self.blocks.offload_pending += zip(seq.block_table[:seq.num_cached_pages], seq.page_keys)
            self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_cached_pages = 0
        seq.num_computed = 0   # recompute: prompt and known outputs are prefilled again
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _reserve(self, seq: Sequence, num_tokens: int, protected: set[str]) -> bool:
        """Grow `seq`'s pages to cover `num_tokens`, preempting newer unscheduled requests."""
        while not self.blocks.grow(seq.block_table, num_tokens):
            victim = next((s for s in reversed(self.running)
                           if s.arrival > seq.arrival and s.request_id not in protected), None)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _chunk_that_fits(self, seq: Sequence, want: int) -> int:
        """Largest chunk <= want whose pages fit in what `seq` holds plus the free pages."""
        room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
        return max(0, min(want, room))

    def schedule(self) -> ScheduledBatch | None:
        """Form the next batch and mark it dispatched (`form` then `commit`)."""
        batch = self.form()
        if batch is not None:
            self.commit(batch)
        return batch

    def form(self) -> ScheduledBatch | None:
        """The next batch: pages reserved, request state not yet advanced.

        Raises ScheduleError naming the request it failed on; the rows formed before it
        keep their pages, and forming again works without that request.
        """
        cfg = self.cfg
        budget, max_rows = cfg.max_num_batched_tokens, cfg.max_num_seqs
        decodes: list[ScheduledRow] = []
        prefills: list[ScheduledRow] = []
        protected: set[str] = set()
        preempted_before = self.num_preemptions

        def full() -> bool:
            return budget == 0 or len(decodes) + len(prefills) >= max_rows

        # 1. Decodes, oldest first. A request whose pending token is surely its last
        #    (max_tokens) sits out; it finishes when that token is read back.
        for seq in list(self.running):
            if full():
                break
            if seq.status is not Status.RUNNING or not seq.in_decode or seq.will_finish_by_length:
                continue
            with _blame(seq):
                if not self._reserve(seq, seq.num_tokens, protected):
                    self._preempt(seq)   # nothing newer to evict: it yields its own pages
                    continue
                gather = seq.pending_row if seq.num_pending else -1
                decodes.append(ScheduledRow(seq, seq.num_tokens - 1, 1, gather, True))
            protected.add(seq.request_id)
            budget -= 1

        # 2. Running requests part-way through their prompt (chunked prefill).
        for seq in list(self.running):
            if full():
                break
            if seq.status is not Status.RUNNING or seq.in_decode or seq.request_id in protected:
                continue
            with _blame(seq):
                want = min(seq.num_tokens - seq.num_computed, budget)
                self._reserve(seq, seq.num_computed + want, protected)
                n = self._chunk_that_fits(seq, want)
                if n == 0 or not self.blocks.grow(seq.block_table, seq.num_computed + n):
                    continue
                prefills.append(self._prefill_row(seq, n))
            protected.add(seq.request_id)
            budget -= n

        # 3. Admit waiting requests first-come first-served (nobody starves). The one
        #    exception: a request whose offloaded pages are still on their way to the device
        #    lets those behind it go first while others keep the device busy (its uploads
        #    finish within a few iterations; waiting for them holds up no one).
        i = 0
        while i < len(self.waiting) and not full() and self.num_preemptions == preempted_before:
            seq = self.waiting[i]
            if seq.num_pending:
                break   # preempted while its last token was on the device: wait for it
            if self.offload is not None and self.running and self.offload.uploading(seq.page_keys):
                i += 1
                continue
            with _blame(seq):
                if not self._fork(seq):
                    break   # an n > 1 sample waits for its leader's prompt pages
                hit = self._map_cached_prefix(seq)   # 0 for a forked sample: it holds pages already
                n = self._chunk_that_fits(seq, min(seq.num_tokens - seq.num_computed, budget))
                if n == 0:
                    self._unmap(seq)
                    break
                self._count_lookup(seq, hit)
                self.waiting.pop(i)
                seq.status = Status.RUNNING
                bisect.insort(self.running, seq, key=lambda s: s.arrival)
                if not self.blocks.grow(seq.block_table, seq.num_computed + n):
                    raise AssertionError("page accounting broke: a fitted chunk could not be allocated")
                prefills.append(self._prefill_row(seq, n))
            protected.add(seq.request_id)
            budget -= n

        if self.offload is not None and i < len(self.waiting):
            # The next to be admitted: pages of its prefix that left the device since it
            # arrived (evicted to host memory) start their way back now, not at admission.
            self.prefetch(self.waiting[i])

        rows = decodes + prefills
        if not rows:
            return None
        return ScheduledBatch(rows=rows, num_decode=len(decodes),
                              num_tokens=sum(r.length for r in rows),
                              num_preempted=self.num_preemptions - preempted_before)

    def _fork(self, seq: Sequence) -> bool:
        """An n > 1 sample shares its leader's full prompt pages rather than prefill them.

        The pages before the one holding the last prompt token are shared (reference
        counted, never written again); the rest of the prompt is recomputed into the
        sample's own pages, so the last, partial page is copied on write by recomputing
        it, and the sample gets the logits of its first token. False: the leader (older,
        so scheduled first) has not yet dispatched those pages; the sample waits for it.
        Without a running leader the sample prefills alone."""
        leader, bs = seq.leader, self.blocks.block_size
        shared = (seq.prompt_len - 1) // bs
        if leader is None or seq.block_table or shared == 0 or leader.is_finished:
            return True
        if leader.status is not Status.RUNNING or leader.num_computed < shared * bs:
            return False
        pages = leader.block_table[:shared]
        self.blocks.share(pages)
        seq.block_table = list(pages)
        seq.num_computed = shared * bs
        # The shared pages are the leader's cached ones: the sample does not offer them again.
        seq.num_cached_pages = min(leader.num_cached_pages, shared)
        seq.page_keys = leader.page_keys[:seq.num_cached_pages]
        return True

    def commit(self, batch: ScheduledBatch) -> None:
        """The batch is dispatched: advance each request's device-side state, and offer
        the pages it completes to the prefix cache.

        Kept apart from `form` so that a batch that cannot be dispatched leaves its
        requests as they were, to be scheduled again.
        """
        for i, row in enumerate(batch.rows):
            row.seq.num_computed = row.start + row.length
            if row.samples:
                row.seq.num_pending += 1
                row.seq.pending_row = i
            self._cache_pages(row.seq)

    # ---- prefix caching -------------------------------------------------------------

    def _keys(self, seq: Sequence, num_pages: int) -> list[bytes]:
        seq.page_keys = extend_keys(seq.page_keys, num_pages, self.blocks.block_size, seq.token_slice)
        return seq.page_keys

    def _cache_pages(self, seq: Sequence) -> None:
        """Offer `seq`'s full pages whose K/V dispatched batches wrote and whose tokens the
        host knows (a token still on the device cannot be hashed yet)."""
        if self.blocks.prefix_cache is None:
            return
        full = min(min(seq.num_computed, seq.num_known) // self.blocks.block_size, len(seq.block_table))
        if full <= seq.num_cached_pages:
            return
        keys = self._keys(seq, full)
        for i in range(seq.num_cached_pages, full):
            self.blocks.cache_page(seq.block_table[i], keys[i])
        seq.num_cached_pages = full

    def _map_cached_prefix(self, seq: Sequence) -> int:
        """Map the cached pages of `seq`'s longest cached prefix; returns how many. At least
        the last token stays to compute: its logits give the next token."""
        if self.blocks.prefix_cache is None or seq.block_table:
            return 0
        keys = self._keys(seq, (seq.num_tokens - 1) // self.blocks.block_size)
        pages = self.blocks.match_prefix(keys)
        if self.offload is not None:
            pages += self._load_offloaded(keys[len(pages):])
        seq.block_table = pages
        seq.num_cached_pages = len(pages)
        seq.num_computed = len(pages) * self.blocks.block_size
        return len(pages)

    def _load_offloaded(self, keys: list[bytes]) -> list[int]:
        """Fresh pages for the keys, from the first, that host memory holds; their K/V is
        copied in before the batch runs, so they are cached (mappable) at once."""
        data = self.offload.take(keys, self.blocks.num_free)
        if not data:
            return []
        pages = self.blocks.allocate(len(data))
        for page, key in zip(pages, keys):
            self.blocks.cache_page(page, key)
        self.offload.queue_load(pages, data)
        return pages

    def prefetch(self, seq: Sequence) -> None:
        """Start moving to the device the offloaded pages `seq` may map when admitted."""
        if self.offload is None:
            return
        keys = self._keys(seq, (seq.num_tokens - 1) // self.blocks.block_size)
        self.offload.prefetch(keys[len(self.blocks.prefix_cache.lookup(keys)):])

    def _unmap(self, seq: Sequence) -> None:
        """Undo `_map_cached_prefix` for a request that stays waiting."""
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_cached_pages = 0
        seq.num_computed = 0

    def _count_lookup(self, seq: Sequence, hit_pages: int) -> None:
        cache = self.blocks.prefix_cache
        if cache is not None:
            cache.stats.requests += 1
            cache.stats.queries += seq.num_tokens
            cache.stats.hits += hit_pages * self.blocks.block_size

    @staticmethod
    def _prefill_row(seq: Sequence, n: int) -> ScheduledRow:
        start = seq.num_computed
        return ScheduledRow(seq, start, n, -1, start + n == seq.num_tokens)
