"""Iteration-level scheduler: one dense batch per iteration under a token budget.

Order inside a batch (the layout `forward_paged` expects): running decodes first, then
prefill chunks (running requests part-way through their prompt, then waiting requests in
arrival order). A prompt longer than the remaining budget is cut into chunks that span
iterations. Pages are reserved as rows are formed; when the pool runs dry the newest
running request is preempted (pages freed, recomputed later) so the oldest always makes
progress. Nothing is admitted in an iteration that had to preempt, which stops a freshly
preempted request from bouncing straight back in.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from typing import Iterator

from nanoflow_jax.engine.block_manager import BlockManager
from nanoflow_jax.engine.config import EngineConfig
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


@contextlib.contextmanager
def _blame(seq: Sequence) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        raise ScheduleError(seq, e) from e


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: list[Sequence] = []   # sorted by arrival
        self.running: list[Sequence] = []   # sorted by arrival; these hold pages
        self.num_preemptions = 0

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
            self.blocks.release(seq.block_table)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            self._unfork(seq)
        seq.block_table = []
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
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

        # 3. Admit waiting requests first-come first-served (no skipping: nobody starves).
        while self.waiting and not full() and self.num_preemptions == preempted_before:
            seq = self.waiting[0]
            if seq.num_pending:
                break   # preempted while its last token was on the device: wait for it
            with _blame(seq):
                if not self._fork(seq):
                    break   # an n > 1 sample waits for its leader's prompt pages
                n = self._chunk_that_fits(seq, min(seq.num_tokens - seq.num_computed, budget))
                if n == 0:
                    self._unfork(seq)
                    break
                self.waiting.pop(0)
                seq.status = Status.RUNNING
                bisect.insort(self.running, seq, key=lambda s: s.arrival)
                if not self.blocks.grow(seq.block_table, seq.num_computed + n):
                    raise AssertionError("page accounting broke: a fitted chunk could not be allocated")
                prefills.append(self._prefill_row(seq, n))
            protected.add(seq.request_id)
            budget -= n

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
        return True

    def _unfork(self, seq: Sequence) -> None:
        """Give back the pages a waiting sample took by `_fork` (it forks again later)."""
        if seq.block_table:
            self.blocks.release(seq.block_table)
            seq.block_table = []
            seq.num_computed = 0

    @staticmethod
    def commit(batch: ScheduledBatch) -> None:
        """The batch is dispatched: advance each request's device-side state.

        Kept apart from `form` so that a batch that cannot be dispatched leaves its
        requests as they were, to be scheduled again.
        """
        for i, row in enumerate(batch.rows):
            row.seq.num_computed = row.start + row.length
            if row.samples:
                row.seq.num_pending += 1
                row.seq.pending_row = i

    @staticmethod
    def _prefill_row(seq: Sequence, n: int) -> ScheduledRow:
        start = seq.num_computed
        return ScheduledRow(seq, start, n, -1, start + n == seq.num_tokens)
