"""200 random requests through the real engine: arrivals while running, random lengths,
some aborted mid-way. Each finishes exactly once, aborted ones never again, and the page
pool is whole at the end. A greedy sample of them is checked against the dense reference."""

from __future__ import annotations

import random

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
