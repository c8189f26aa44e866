"""The engine thread against a scripted engine: routing, aborts, admission, timeouts, crashes."""

from __future__ import annotations

import asyncio
import time

import pytest

from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.serve.engine_thread import EngineThread, RequestGroup
from nanoflow_jax.serve.metrics import ServerMetrics
from nanoflow_jax.serve.protocol import APIError
from tests.serve.fakes import FakeEngine


def _run(coro_fn, engine: FakeEngine, **kw):
    """Run `coro_fn(thread)` on a fresh loop with an engine thread around it."""
    metrics = ServerMetrics()

    async def main():
        thread = EngineThread(engine, metrics, **kw)
        thread.start(asyncio.get_running_loop())
        try:
            return await coro_fn(thread)
        finally:
            await asyncio.to_thread(thread.stop, 10)
            assert not thread.is_alive()

    return asyncio.run(main()), metrics


def _count(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_request_gets_its_own_updates_once():
    engine = FakeEngine()

    async def go(thread):
        groups = [RequestGroup(thread, f"g{i}", ["ab", [1, 2, 3]], SamplingParams(max_tokens=2 + i))
                  for i in range(20)]
        seen = await asyncio.gather(*(_drain(g) for g in groups))
        return groups, seen

    (groups, seen), metrics = _run(go, engine)
    for i, (g, updates) in enumerate(zip(groups, seen)):
        for k, rid in enumerate(g.ids):
            mine = [u for u in updates if u.request_id == rid]
            assert [u.outputs[0].delta_text for u in mine] == [f"t{j}" for j in range(2 + i)]
            assert [u.finished for u in mine] == [False] * (1 + i) + [True]
    assert _count(metrics, "nanoflow_request_finished_total", finished_reason="length") == 40
    assert _count(metrics, "nanoflow_generation_tokens_total") == sum(2 * (2 + i) for i in range(20))
    assert _count(metrics, "nanoflow_prompt_tokens_total") == 20 * (2 + 3)
    assert _count(metrics, "nanoflow_time_to_first_token_seconds_count") == 40
    assert _count(metrics, "nanoflow_kv_pages_free") == engine.num_pages and not engine.aborted


async def _drain(group: RequestGroup) -> list:
    out = []
    while group.pending:
        out.append(await group.next())
    return out


def test_abort_stops_updates_and_reaches_the_engine():
    engine = FakeEngine()

    async def go(thread):
        g = RequestGroup(thread, "a", ["x", "y"], SamplingParams(max_tokens=10**9))
        first = await g.next()
        g.close()
        await asyncio.sleep(0.1)
        return g, first

    (g, first), metrics = _run(go, engine)
    assert not first.finished and sorted(engine.aborted) == g.ids and not engine.reqs
    assert _count(metrics, "nanoflow_request_finished_total", finished_reason="abort") == 2


def test_waiting_is_bounded_until_the_first_token_then_timeouts_abort():
    engine = FakeEngine()
    engine.hold.set()   # nobody gets a token

    async def go(thread):
        a = RequestGroup(thread, "a", ["x", "y"], SamplingParams(), timeout=0.3)
        with pytest.raises(APIError) as full:
            RequestGroup(thread, "b", ["z"], SamplingParams())
        assert thread.num_waiting == 2
        with pytest.raises(APIError) as late:
            await a.next()
        engine.hold.clear()
        b = RequestGroup(thread, "c", ["z"], SamplingParams(max_tokens=2))
        return full.value, late.value, await b.collect(), thread.num_waiting

    (full, late, done, waiting), metrics = _run(go, engine, max_waiting=2, retry_after=3)
    assert full.status == 503 and full.headers == {"Retry-After": "3"} and "--max-waiting-requests 2" in full.message
    assert late.status == 504 and late.code == "request_timeout" and sorted(engine.aborted) == ["a-0", "a-1"]
    assert done[0].outputs[0].text == "t0t1" and waiting == 0
    assert _count(metrics, "nanoflow_request_finished_total", finished_reason="timeout") == 2


def test_refused_and_failed_requests_fail_alone():
    engine = FakeEngine()

    async def go(thread):
        bad = RequestGroup(thread, "bad", ["ok", "reject"], SamplingParams(max_tokens=10**9))
        boom = RequestGroup(thread, "boom", ["boom"], SamplingParams())
        good = RequestGroup(thread, "good", ["fine"], SamplingParams(max_tokens=3))
        errors = []
        for g in (bad, boom):
            with pytest.raises(APIError) as e:
                await g.collect()
            errors.append(e.value)
        return errors, await good.collect()

    (errors, good), _ = _run(go, engine)
    assert errors[0].status == 400 and errors[0].message == "the prompt is refused" and errors[0].param == "prompt"
    assert errors[1].status == 500 and errors[1].message == "request failed: boom"
    assert good[0].outputs[0].text == "t0t1t2"
    assert engine.aborted == ["bad-0"]   # the refused prompt's sibling


def test_a_raising_step_fails_the_running_requests_and_the_thread_serves_on():
    engine = FakeEngine()
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = flaky_step

    async def go(thread):
        g = RequestGroup(thread, "a", ["x"], SamplingParams(max_tokens=10))
        with pytest.raises(APIError) as e:
            await g.collect()
        again = RequestGroup(thread, "b", ["x"], SamplingParams(max_tokens=2))
        return e.value, await again.collect()

    (err, again), _ = _run(go, engine)
    assert err.status == 500 and "device lost" in err.message and engine.aborted == ["a-0"]
    assert again[0].finished


def test_stop_fails_what_still_runs_with_503():
    engine = FakeEngine()
    engine.hold.set()

    async def go(thread):
        g = RequestGroup(thread, "a", ["x"], SamplingParams())
        await asyncio.sleep(0.05)
        await asyncio.to_thread(thread.stop, 10)
        with pytest.raises(APIError) as e:
            await g.next()
        with pytest.raises(APIError) as closed:
            RequestGroup(thread, "b", ["x"], SamplingParams())
        return e.value, closed.value

    (err, closed), _ = _run(go, engine)
    assert err.status == 503 and closed.status == 503 and engine.aborted == ["a-0"]


def test_the_loop_is_never_blocked_by_a_slow_step():
    """A step that takes 0.3 s must not delay the event loop (it runs on the engine thread)."""
    engine = FakeEngine()
    real_step = engine.step

    def slow_step():
        time.sleep(0.3)
        return real_step()

    engine.step = slow_step

    async def go(thread):
        g = RequestGroup(thread, "a", ["x"], SamplingParams(max_tokens=2))
        ticks = 0
        task = asyncio.ensure_future(g.collect())
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return ticks

    ticks, _ = _run(go, engine)
    assert ticks > 20
