"""Scheduler tests on the host alone: a fake device answers each row with a token.

`FakeDevice` reproduces the engine's bookkeeping (read tokens one iteration late in async
mode, drop tokens of finished requests) so the scheduler's invariants are checked on
thousands of iterations without running a model.
"""

from __future__ import annotations

import random

from nanoflow_jax.engine.block_manager import BlockManager
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.scheduler import ScheduledBatch, ScheduleError, Scheduler
from nanoflow_jax.engine.sequence import Sequence, Status
from nanoflow_jax.models.paged import NULL_PAGE


def make(num_pages: int = 100, budget: int = 16, max_seqs: int = 4, block: int = 4) -> Scheduler:
    cfg = EngineConfig(max_model_len=256, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                       block_size=block, num_kv_pages=num_pages)
    return Scheduler(cfg, BlockManager(num_pages, block))


def seq(i: int, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(request_id=str(i), arrival=i, prompt=None, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_tokens=max_tokens), seed=0, max_tokens=max_tokens)


def deliver(s: Scheduler, batch: ScheduledBatch) -> list[Sequence]:
    """Read back one iteration: every sampling row gets token 1; finish at max_tokens."""
    done = []
    for row in batch.rows:
        q = row.seq
        if not row.samples or q.is_finished:
            continue
        q.num_pending -= 1
        q.output_token_ids.append(1)
        if len(q.output_token_ids) >= q.max_tokens:
            s.finish(q, "length")
            done.append(q)
    return done


def check_invariants(s: Scheduler, batch: ScheduledBatch) -> None:
    cfg = s.cfg
    assert batch.num_tokens <= cfg.max_num_batched_tokens and len(batch.rows) <= cfg.max_num_seqs
    assert all(r.length == 1 for r in batch.rows[: batch.num_decode])
    # Only decodes read their input from the in-flight output.
    assert all(r.gather_row < 0 or (i < batch.num_decode and r.length == 1) for i, r in enumerate(batch.rows))
    held = [p for q in s.running for p in q.block_table]
    assert NULL_PAGE not in held and len(held) == len(set(held)), "a page is in two block tables"
    assert len(held) + s.blocks.num_free == s.blocks.num_usable, "pages leaked"
    assert all(not q.block_table for q in s.waiting)
    for r in batch.rows:
        assert r.seq.status is Status.RUNNING
        assert len(r.seq.block_table) * cfg.block_size >= r.start + r.length


def test_budget_chunking_and_decode_first():
    s = make(budget=16, max_seqs=4)
    a, b = seq(0, 40, 3), seq(1, 5, 3)
    s.add(a)
    s.add(b)
    shapes = []
    for _ in range(4):
        batch = s.schedule()
        check_invariants(s, batch)
        shapes.append([(r.seq.request_id, r.start, r.length, r.samples) for r in batch.rows])
        deliver(s, batch)
    assert shapes[0] == [("0", 0, 16, False)]                    # a long prompt is chunked
    assert shapes[1] == [("0", 16, 16, False)]
    assert shapes[2] == [("0", 32, 8, True), ("1", 0, 5, True)]  # leftover budget admits b
    assert shapes[3] == [("0", 40, 1, True), ("1", 5, 1, True)]  # then decodes, oldest first


def test_decodes_come_before_prefills_and_use_the_in_flight_row():
    s = make(budget=16, max_seqs=4)
    a = seq(0, 3, 5)
    s.add(a)
    first = s.schedule()
    s.add(seq(1, 30, 2))
    second = s.schedule()   # formed before `first` was read back (async)
    assert second.num_decode == 1 and second.rows[0].seq is a
    assert second.rows[0].gather_row == 0 and a.num_pending == 2
    assert second.rows[1].seq.request_id == "1" and second.rows[1].length == 15
    deliver(s, first)
    assert a.num_pending == 1 and a.output_token_ids == [1]


def test_preemption_frees_pages_and_the_request_resumes():
    # 6 usable pages of 4 tokens; three requests of 8 + 8 tokens cannot all stay resident.
    s = make(num_pages=7, budget=16, max_seqs=4)
    seqs = [seq(i, 8, 8) for i in range(3)]
    for q in seqs:
        s.add(q)
    finished = []
    for _ in range(200):
        batch = s.schedule()
        if batch is None:
            break
        check_invariants(s, batch)
        finished += deliver(s, batch)
    assert s.num_preemptions > 0
    assert sorted(q.request_id for q in finished) == ["0", "1", "2"]
    assert all(len(q.output_token_ids) == 8 for q in seqs)
    assert s.blocks.all_free() and not s.has_unfinished()


def test_random_workload_async_pipeline_keeps_invariants():
    rng = random.Random(0)
    s = make(num_pages=30, budget=24, max_seqs=6)
    pending = [seq(i, rng.randint(1, 60), rng.randint(1, 30)) for i in range(150)]
    finished: list[str] = []
    in_flight = None
    for _ in range(20000):
        while pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        batch = s.schedule()
        if batch is not None:
            check_invariants(s, batch)
        if in_flight is not None:     # read the previous iteration one step late
            finished += [q.request_id for q in deliver(s, in_flight)]
        in_flight = batch
        if not pending and not s.has_unfinished() and in_flight is None:
            break
    assert sorted(finished, key=int) == [str(i) for i in range(150)], "a request was lost or duplicated"
    assert s.num_preemptions > 0 and s.blocks.all_free()


def test_random_forming_and_packing_failures_keep_invariants(monkeypatch):
    """Forms that fail on a request (ScheduleError) and formed batches that are never
    dispatched (a packing failure: one request fails, the rest stay uncommitted) leave the
    scheduler consistent: no page leaks, every request ends exactly once."""
    rng = random.Random(1)
    s = make(num_pages=30, budget=24, max_seqs=6)
    pending = [seq(i, rng.randint(1, 60), rng.randint(1, 30)) for i in range(150)]
    prefill_row = s._prefill_row

    def flaky_prefill_row(q: Sequence, n: int):
        if rng.random() < 0.02:
            raise RuntimeError("flaky")
        return prefill_row(q, n)

    monkeypatch.setattr(s, "_prefill_row", flaky_prefill_row)
    ended: list[str] = []
    in_flight = None
    failures = 0
    for _ in range(20000):
        while pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        try:
            batch = s.form()
        except ScheduleError as e:
            s.finish(e.seq, "error")
            ended.append(e.seq.request_id)
            batch = None
            failures += 1
        if batch is not None and rng.random() < 0.05:
            victim = rng.choice(batch.rows).seq
            s.finish(victim, "error")
            ended.append(victim.request_id)
            batch = None
            failures += 1
        if batch is not None:
            s.commit(batch)
            check_invariants(s, batch)
        if in_flight is not None:
            ended += [q.request_id for q in deliver(s, in_flight)]
        in_flight = batch
        if not pending and not s.has_unfinished() and in_flight is None:
            break
    assert failures > 10
    assert sorted(ended, key=int) == [str(i) for i in range(150)], "a request was lost or ended twice"
    assert s.blocks.all_free()


def test_a_request_waits_for_its_uploads_while_others_run():
    """A waiting request whose offloaded pages are still on their way to the device is not
    admitted while others keep the device busy, and those behind it go first; alone, it is
    admitted at once."""
    class Uploading:
        pending = {"1"}

        def uploading(self, keys) -> bool:
            return bool(self.pending & set(keys))

    s = make(budget=32, max_seqs=4)
    s.offload = Uploading()
    s.add(seq(0, 8, 4))
    s.schedule()
    s.add(seq(1, 8, 4))
    s.add(seq(2, 8, 4))
    s.waiting[0].page_keys = ["1"]     # request 1's keys are uploading
    assert [r.seq.request_id for r in s.schedule().rows] == ["0", "2"], "1 waits, 2 goes first"
    s.offload.pending = set()
    assert [r.seq.request_id for r in s.schedule().rows] == ["0", "2", "1"]
    alone = make()
    alone.offload = Uploading()
    alone.add(seq(1, 8, 4))
    alone.waiting[0].page_keys = ["1"]
    assert [r.seq.request_id for r in alone.schedule().rows] == ["1"], "alone: admitted at once"
