"""Request storms through the real engine: arrivals while running, random lengths,
some aborted mid-way. Each finishes exactly once, aborted ones never again, and the page
pool is whole at the end. A greedy sample of them is checked against the dense reference;
text storms (stop strings, threads) check that streamed deltas add up to the final text."""

from __future__ import annotations

import random
import threading

import pytest

from nanoflow_jax import SamplingParams
from tests.engine.conftest import make_llm, random_prompts, reference_greedy


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_200_random_requests_finish_exactly_once(async_scheduling):
    rng = random.Random(42)
    llm = make_llm(async_scheduling=async_scheduling)
    eng = llm.engine
    n = 200
    prompts = random_prompts(n, [rng.randint(1, 90) for _ in range(n)], seed=7)
    params = [SamplingParams(temperature=rng.choice([0.0, 0.0, 1.0]), top_k=rng.choice([-1, 8]),
                             max_tokens=rng.randint(1, 24), ignore_eos=True, seed=i) for i in range(n)]
    to_abort = set(rng.sample(range(n), 25))
    finished: dict[str, object] = {}
    aborted: set[str] = set()
    added = 0
    steps = 0
    while added < n or eng.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if added < n:
                eng.add_request(prompts[added], params[added], request_id=str(added))
                added += 1
        for out in eng.step():
            assert out.request_id not in finished and out.request_id not in aborted, \
                f"request {out.request_id} produced output after it ended"
            if out.finished:
                finished[out.request_id] = out
        steps += 1
        for i in list(to_abort):
            if i < added and rng.random() < 0.05:
                if eng.abort(str(i)) is not None:
                    aborted.add(str(i))
                to_abort.discard(i)
        assert steps < 5000, "the engine stopped making progress"
    assert aborted, "the test aborted nothing"
    assert set(finished) | aborted == {str(i) for i in range(n)} and not set(finished) & aborted
    for rid, out in finished.items():
        assert len(out.outputs[0].token_ids) == params[int(rid)].max_tokens
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.all_free() and not eng.scheduler.running and not eng.scheduler.waiting
    greedy = [i for i in range(n) if str(i) in finished and params[i].temperature == 0][:12]
    ref = reference_greedy([prompts[i] for i in greedy], 24)
    for i, r in zip(greedy, ref):
        got = finished[str(i)].outputs[0].token_ids
        assert got == r[: len(got)], f"request {i} differs from the dense reference"


def _storm_requests(rng: random.Random, base: list, n: int) -> list[SamplingParams]:
    """Greedy requests (`base`: their greedy outputs) whose stop strings hit mid-text
    (several tokens long), stops that never hit, a stop whose start is common, stop tokens
    and EOS with a stop string pending, and seeded sampled ones."""
    out = []
    for i in range(n):
        text, ids = base[i % len(base)].outputs[0].text, base[i % len(base)].outputs[0].token_ids
        kind = rng.randrange(5)
        stop_ids: list[int] = []
        if kind == 0 and len(text) > 8:
            at = rng.randrange(2, len(text) - 4)
            stop: list[str] = [text[at:at + rng.randint(2, 4)], "\x00\x01never"]
        elif kind in (1, 2):
            stop = [text[-1:] + "\x02\x03" if text else "zz", "\n\n\n"]
            stop_ids = [ids[rng.randrange(len(ids))]] if kind == 2 else []
        else:
            stop = []
        out.append(SamplingParams(temperature=0.9 if kind == 4 else 0.0, max_tokens=rng.randint(1, 20),
                                  ignore_eos=kind != 2, stop=stop, stop_token_ids=stop_ids, seed=i))
    return out


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_text_storm_deltas_add_up(tokenizer, async_scheduling):
    """Text requests with mixed stop strings arrive while others run; some are aborted, the
    small pool preempts. Every request ends exactly once, its streamed deltas add up to its
    final text and tokens, and the pool is whole at the end."""
    rng = random.Random(5)
    llm = make_llm(tokenizer=tokenizer, async_scheduling=async_scheduling, num_kv_pages=24)
    eng = llm.engine
    words = ["The", " capital", " of", " France", " is", " héllo", " ✓", " 42", "\n"]
    prompts = ["".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(24)]
    base = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    n = 120
    params = _storm_requests(rng, base, n)
    to_abort = set(rng.sample(range(n), 15))
    deltas: dict[str, list] = {str(i): [] for i in range(n)}
    final: dict[str, object] = {}
    added = steps = 0
    while added < n or eng.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if added < n:
                eng.add_request(prompts[added % len(prompts)], params[added], request_id=str(added))
                added += 1
        updates = eng.step()
        for i in [i for i in to_abort if i < added and rng.random() < 0.1]:
            to_abort.discard(i)
            out = eng.abort(str(i))
            if out is not None:
                assert out.outputs[0].finish_reason == "abort"
                updates.append(out)
        for out in updates:
            rid = out.request_id
            assert rid not in final, f"request {rid} updated after it ended"
            deltas[rid].append(out.outputs[0])
            if out.finished:
                final[rid] = out
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    assert sorted(final, key=int) == [str(i) for i in range(n)]
    reasons = {out.outputs[0].finish_reason for out in final.values()}
    assert {"stop", "length", "abort"} <= reasons, reasons
    for rid, out in final.items():
        comp = out.outputs[0]
        assert "".join(d.delta_text for d in deltas[rid]) == comp.text, f"request {rid}: deltas != text"
        assert [t for d in deltas[rid] for t in d.delta_token_ids] == comp.token_ids
        for stop in params[int(rid)].stop:
            assert stop not in comp.text
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.all_free() and not eng.scheduler.running and not eng.scheduler.waiting


def test_threaded_stream_storm(tokenizer):
    """Three threads stream mixed requests from one LLM at once, one of them dropping its
    stream part-way: each sees only its own requests, each exactly once, deltas adding up."""
    llm = make_llm(tokenizer=tokenizer, num_kv_pages=24)
    rng = random.Random(9)
    prompts = ["The capital of France is", " héllo ✓", "a", "\n\n", "42 is"]
    base = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    jobs = [_storm_requests(rng, base, 12) for _ in range(3)]
    seen: list[dict[str, list]] = [{}, {}, {}]
    errors: list[BaseException] = []

    def consume(k: int) -> None:
        try:
            for m, upd in enumerate(llm.stream([prompts[j % len(prompts)] for j in range(12)], jobs[k])):
                seen[k].setdefault(upd.request_id, []).append(upd)
                if k == 2 and m == 15:
                    break   # dropped early: its unfinished requests are aborted
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    ids = [set(s) for s in seen]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    for k in (0, 1):
        assert len(seen[k]) == 12
        for rid, ups in seen[k].items():
            assert [u.finished for u in ups].count(True) == 1 and ups[-1].finished
            assert "".join(u.outputs[0].delta_text for u in ups) == ups[-1].outputs[0].text
    assert not llm.engine.scheduler.has_unfinished() and llm.engine.blocks.all_free() and not llm._routes
