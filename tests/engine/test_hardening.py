"""Bad input and failures stay with the request that caused them: exact ranges for every
sampling field, per-request prompt errors, a batch that cannot be formed, packed or read
back, and calls interrupted part-way. After each, the engine serves the others correctly
and the page pool is whole."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.scheduler import ScheduledBatch, ScheduledRow
from nanoflow_jax.engine.sequence import Sequence
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
I32, U32 = 2**31, 2**32

BAD_PARAMS = [
    ("top_k", 2**31), ("top_k", -2), ("top_k", 2.0), ("top_k", True),
    ("seed", 2**32), ("seed", -1), ("seed", 1.0),
    ("max_tokens", 2**31), ("max_tokens", 0), ("max_tokens", 3.0),
    ("stop_token_ids", [2**31]), ("stop_token_ids", [-1]), ("stop_token_ids", [1.5]), ("stop_token_ids", [True]),
    ("stop_token_ids", 5.0), ("stop", [""]), ("stop", [b"x"]), ("stop", 5),
    ("temperature", math.inf), ("temperature", 1e39), ("temperature", math.nan), ("temperature", -1.0),
    ("temperature", 1e-30), ("temperature", 101.0), ("temperature", "1"),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.inf),
    ("min_p", math.nan), ("min_p", -0.1), ("min_p", math.inf), ("ignore_eos", 1),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_out_of_range_sampling_params_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}=.* is invalid: "):
        SamplingParams(**{field: value})


def test_range_edges_and_numpy_scalars_are_accepted():
    edge = SamplingParams(top_k=I32 - 1, seed=U32 - 1, max_tokens=I32 - 1, stop_token_ids=[I32 - 1, 0],
                          temperature=100.0, top_p=1e-30, min_p=1.0)
    assert edge.top_k == I32 - 1
    sp = SamplingParams(top_k=np.int64(5), seed=np.uint32(7), temperature=np.float32(0.5),
                        stop_token_ids=np.array([3, 4]), max_tokens=np.int32(9))
    assert (type(sp.top_k), type(sp.seed), type(sp.temperature), type(sp.max_tokens)) == (int, int, float, int)
    assert sp.stop_token_ids == (3, 4) and all(type(t) is int for t in sp.stop_token_ids)
    assert sp == SamplingParams(top_k=5, seed=7, temperature=0.5, stop_token_ids=[3, 4], max_tokens=9)


def test_out_of_range_params_fail_their_request_alone():
    llm = make_llm()
    prompts = random_prompts(3, [4, 9, 6], seed=15)
    bad = [{"top_k": 2**31}, {"seed": 2**32}, {"temperature": math.inf}, {"stop_token_ids": [2**31]}]
    for b in bad:
        outs = llm.generate(prompts, [GREEDY, b, GREEDY])
        field = next(iter(b))
        assert outs[1].error.startswith("request 'gen-") and f"SamplingParams.{field}=" in outs[1].error
        assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == \
            reference_greedy([prompts[0], prompts[2]], 6)
    assert llm.engine.blocks.all_free() and not llm.engine.has_unfinished()


def _pack(llm, params: list[SamplingParams]) -> None:
    """The runner's real host packing of one batch with these params (no device work)."""
    rows = [ScheduledRow(Sequence(request_id=str(i), arrival=i, prompt=None, prompt_token_ids=[1, 2],
                                  params=sp, seed=sp.seed or 0, max_tokens=4, block_table=[1]),
                         0, 2, -1, True) for i, sp in enumerate(params)]
    llm.engine.runner.prepare(ScheduledBatch(rows=rows, num_decode=0, num_tokens=2 * len(rows), num_preempted=0))


def test_fuzz_every_accepted_sampling_params_packs():
    """Random field values (fixed seed): each is either rejected up front or packs cleanly."""
    llm = make_llm()
    rng = random.Random(1)
    ints = [0, 1, -1, -2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, -2**31 - 1, np.int64(3), True]
    floats = [0.0, 0.5, 1.0, 1e-6, 1e-5, 100.0, 1e39, -0.0, math.inf, -math.inf, math.nan, np.float32(0.3), 2]
    choices = {"temperature": floats, "top_p": floats, "min_p": floats, "top_k": ints + floats,
               "seed": ints + [None], "max_tokens": ints + [None]}
    accepted = rejected = 0
    for _ in range(600):
        kw = {k: rng.choice(v) for k, v in choices.items() if rng.random() < 0.35}
        if rng.random() < 0.3:
            kw["stop_token_ids"] = [rng.choice(ints)]
        try:
            sp = SamplingParams(**kw)
        except ValueError as e:
            assert str(e).startswith("SamplingParams.") and " is invalid: " in str(e)
            rejected += 1
            continue
        _pack(llm, [sp, SamplingParams()])
        accepted += 1
    assert accepted > 80 and rejected > 80, (accepted, rejected)


def test_bad_prompts_fail_alone_in_one_call(tokenizer):
    llm = make_llm(tokenizer=tokenizer)
    good = random_prompts(2, [5, 9], seed=3)
    batch = [good[0], "\ud800", [1, float("inf")], [1.5, 2.7], ["5", "6"], b"hi", [True, False],
             {"nothing": 1}, 7, [np.int64(5), np.int32(6)], good[1]]
    outs = llm.generate(batch, GREEDY)
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[-1] is None and errors[-2] is None
    assert "lone surrogate" in errors[1]
    assert "inf" in errors[2] and "must be ints" in errors[2]
    assert "1.5" in errors[3] and "'5'" in errors[4] and "bytes" in errors[5] and "True" in errors[6]
    assert "prompt_token_ids" in errors[7] and "got int" in errors[8]
    ref = reference_greedy([good[0], [5, 6], good[1]], 6)
    assert [outs[i].outputs[0].token_ids for i in (0, 9, 10)] == ref
    assert outs[9].prompt_token_ids == [5, 6]
    assert all(o.outputs[0].finish_reason == "error" and o.finished for o in outs[1:9])
    # A single prompt of ids is recognised as one prompt, and rejected as one.
    assert [o.error is not None for o in llm.generate([1, float("inf")], GREEDY)] == [True]
    assert [o.error is not None for o in llm.generate([True, False], GREEDY)] == [True]
    eng = llm.engine
    assert not eng.scheduler.has_unfinished() and eng.blocks.all_free() and not llm._routes


def _drain(eng, limit: int = 2000) -> dict:
    finished = {}
    for _ in range(limit):
        if not eng.has_unfinished():
            return finished
        for out in eng.step():
            assert out.request_id not in finished, f"{out.request_id} finished twice"
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("the engine stopped making progress")


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_unpackable_request_fails_alone(async_scheduling):
    """A value that passed validation but does not fit the device batch (forced past the
    checks here) fails its own request; the rest of its batch finishes correctly."""
    llm = make_llm(async_scheduling=async_scheduling)
    eng = llm.engine
    prompts = random_prompts(4, [7, 30, 3, 12], seed=11)
    bad = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    object.__setattr__(bad, "top_k", 2**31)
    for i, p in enumerate(prompts):
        eng.add_request(p, bad if i == 1 else GREEDY, request_id=f"r{i}")
    finished = _drain(eng)
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    failed = finished["r1"]
    assert failed.outputs[0].finish_reason == "error" and "packing" in failed.error and "Overflow" in failed.error
    ref = reference_greedy([prompts[i] for i in (0, 2, 3)], 6)
    assert [finished[r].outputs[0].token_ids for r in ("r0", "r2", "r3")] == ref
    assert eng.blocks.all_free()
    # The engine keeps serving, through LLM.generate too (one bad request among good ones).
    outs = llm.generate(prompts[:3], [GREEDY, bad, GREEDY])
    assert outs[1].error and [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == ref[:2]


def test_forming_and_read_back_failures_fail_alone(monkeypatch):
    llm = make_llm()
    eng = llm.engine
    prompts = random_prompts(4, [9, 40, 5, 14], seed=12)
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=f"r{i}")
    prefill_row = eng.scheduler._prefill_row

    def broken_prefill_row(seq, n):
        if seq.request_id == "r1":
            raise RuntimeError("cannot form this row")
        return prefill_row(seq, n)

    monkeypatch.setattr(eng.scheduler, "_prefill_row", broken_prefill_row)

    class BrokenDecoder:
        def add(self, token: int) -> str:
            raise UnicodeError("cannot decode")

    eng._seqs["r2"].detok = BrokenDecoder()
    finished = _drain(eng)
    assert "scheduling" in finished["r1"].error and "cannot form" in finished["r1"].error
    assert "detokenizing" in finished["r2"].error
    assert finished["r1"].outputs[0].finish_reason == finished["r2"].outputs[0].finish_reason == "error"
    ref = reference_greedy([prompts[0], prompts[3]], 6)
    assert [finished["r0"].outputs[0].token_ids, finished["r3"].outputs[0].token_ids] == ref
    assert eng.blocks.all_free()


def test_interrupted_calls_leave_nothing_behind(monkeypatch):
    llm = make_llm()
    eng = llm.engine
    prompts = random_prompts(6, seed=13)
    step, calls = eng.step, [0]

    def interrupted_step():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(eng, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY)
    assert not eng.scheduler.has_unfinished() and eng.blocks.all_free() and not llm._routes

    add, added = eng.add_request, [0]

    def interrupted_add(*args, **kwargs):
        added[0] += 1
        if added[0] == 3:
            raise KeyboardInterrupt
        return add(*args, **kwargs)

    monkeypatch.setattr(eng, "add_request", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY)
    assert not eng.scheduler.has_unfinished() and eng.blocks.all_free() and not llm._routes
    monkeypatch.undo()
    # No output of an abandoned call leaks into the next one.
    outs = llm.generate(prompts[:2], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference_greedy(prompts[:2], 6)
    assert eng.blocks.all_free()


@pytest.mark.parametrize("where", ["read_back", "read_back_finishing", "after_commit"])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_interrupted_step_loses_no_request(monkeypatch, async_scheduling, where):
    """An interrupt while a step reads tokens back (also right after a request finished),
    or right after it dispatched and committed a batch: the requests whose tokens it cannot
    track fail, the updates it made come with the next step, and every request ends
    exactly once with its token deltas adding up."""
    llm = make_llm(async_scheduling=async_scheduling)
    eng = llm.engine
    prompts = random_prompts(5, [6, 20, 3, 11, 8], seed=14)
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=f"r{i}")
    owner, name = (eng.scheduler, "commit") if where == "after_commit" else (eng, "_append")
    real, calls, fired = getattr(owner, name), [0], [False]

    def interrupted(*args):
        calls[0] += 1
        result = real(*args)
        if where == "read_back_finishing":
            hit = args[0].is_finished
        else:
            hit = calls[0] == (8 if where == "read_back" else 3)
        if hit and not fired[0]:
            fired[0] = True
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupted)
    finished: dict = {}
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(5)}
    for _ in range(500):
        if not eng.has_unfinished():
            break
        try:
            updates = eng.step()
        except KeyboardInterrupt:
            continue
        for out in updates:
            assert out.request_id not in finished, f"{out.request_id} finished twice"
            tokens[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                finished[out.request_id] = out
    assert fired[0] and sorted(finished) == [f"r{i}" for i in range(5)]
    assert all(tokens[r] == o.outputs[0].token_ids for r, o in finished.items())
    failed = [r for r, o in finished.items() if o.error]
    if where != "read_back_finishing":   # there the interrupted request had finished: nothing fails
        assert failed
    assert all(("tracking" if where == "after_commit" else "reading back") in finished[r].error for r in failed)
    ok = [i for i in range(5) if f"r{i}" not in failed]
    ref = reference_greedy([prompts[i] for i in ok], 6)
    assert [finished[f"r{i}"].outputs[0].token_ids for i in ok] == ref
    assert eng.blocks.all_free() and not eng.scheduler.has_unfinished()


def test_request_waiting_for_a_lost_token_fails_alone():
    """A request counting a token that no in-flight batch will deliver (as after an
    interrupt between dispatch and bookkeeping) would block admission forever: it fails
    alone and the requests behind it run."""
    llm = make_llm()
    eng = llm.engine
    prompts = random_prompts(3, [5, 8, 4], seed=16)
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=f"r{i}")
    eng._seqs["r0"].num_pending = 1
    finished = _drain(eng)
    assert finished["r0"].outputs[0].finish_reason == "error" and "lost" in finished["r0"].error
    assert [finished["r1"].outputs[0].token_ids, finished["r2"].outputs[0].token_ids] == \
        reference_greedy(prompts[1:], 6)
    assert eng.blocks.all_free()
