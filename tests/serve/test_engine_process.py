"""The engine in a child process: updates cross as deltas and come out equal to the engine's;
greedy outputs through the process equal the dense reference; refusals, aborts, a dead child."""

from __future__ import annotations

import asyncio
import dataclasses

import jax
import numpy as np
import pytest

from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.serve.engine_process import RemoteLLM
from nanoflow_jax.serve.engine_thread import EngineThread, RequestGroup
from nanoflow_jax.serve.metrics import ServerMetrics
from nanoflow_jax.serve.protocol import APIError
from nanoflow_jax.serve.wire import UpdateDecoder, UpdateEncoder
from tests.engine.conftest import ENGINE_KW, TINY, byte_tokenizer, make_llm, random_prompts, reference_greedy, \
    tiny_params


def test_deltas_rebuild_every_update():
    """n samples, logprobs, stop strings, stream intervals: decode(encode(update)) == update, each step."""
    llm = make_llm(tokenizer=byte_tokenizer())
    engine = llm.engine
    rng = np.random.default_rng()
    cases = [dict(n=2, temperature=1.0, seed=int(rng.integers(1 << 30)), max_tokens=12, logprobs=2),
             dict(temperature=1.0, seed=int(rng.integers(1 << 30)), max_tokens=20, stop=["e", "a "]),
             dict(temperature=0.0, max_tokens=9, prompt_logprobs=1),
             dict(temperature=0.8, seed=int(rng.integers(1 << 30)), max_tokens=15, logprobs=0)]
    for i, kw in enumerate(cases):
        for interval in (1, 3):
            engine.add_request("hello wörld " * (i + 1), SamplingParams(**kw), request_id=f"r{i}-{interval}",
                               stream_interval=interval)
    encoder, decoder = UpdateEncoder(), UpdateDecoder()
    seen, finished = 0, set()
    while engine.has_unfinished():
        outputs = engine.step()
        rebuilt = decoder.decode(encoder.encode(outputs))
        assert rebuilt == outputs
        seen += len(outputs)
        finished |= {o.request_id for o in outputs if o.finished}
    assert len(finished) == 2 * len(cases) and seen > 3 * len(finished)
    assert not encoder._sent and not decoder._requests   # finished requests leave no state behind
    # An update still in flight for a request the server has aborted (forgotten) is not kept.
    engine.add_request("late", SamplingParams(max_tokens=5, ignore_eos=True), request_id="late")
    while "late" not in decoder._requests:
        decoder.decode(encoder.encode(engine.step()))
    decoder.forget("late")
    decoder.decode(encoder.encode(engine.step()))
    assert not decoder._requests
    engine.abort("late")


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def remote():
    llm = RemoteLLM(dict(params=_numpy(tiny_params()), config=TINY, tokenizer=byte_tokenizer(), **ENGINE_KW),
                    start_timeout=300)
    yield llm
    llm.close()
    assert llm._process.exitcode == 0


def _serve(llm, coro_fn):
    async def main():
        thread = EngineThread(llm.engine, ServerMetrics())
        thread.start(asyncio.get_running_loop())
        try:
            return await coro_fn(thread)
        finally:
            await asyncio.to_thread(thread.stop, 30)

    return asyncio.run(main())


def test_greedy_through_the_process_equals_reference(remote):
    prompts = random_prompts(6, seed=int(np.random.default_rng().integers(1 << 30)))

    async def go(thread):
        group = RequestGroup(thread, "g", prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        return await group.collect()

    outs = _serve(remote, go)
    assert [o.outputs[0].token_ids for o in outs] == reference_greedy(prompts, 8)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert remote.engine.stats()["kv_pages_free"] == remote.engine.stats()["kv_pages_total"]


def test_refusal_abort_and_chat(remote):
    async def go(thread):
        too_long = RequestGroup(thread, "long", [[1] * 500], SamplingParams(max_tokens=4))
        with pytest.raises(APIError) as refused:
            await too_long.collect()
        bad_bias = RequestGroup(thread, "bias", [[1, 2]], SamplingParams(max_tokens=4, logit_bias={10 ** 6: 1.0}))
        with pytest.raises(APIError) as biased:
            await bad_bias.collect()
        slow = RequestGroup(thread, "slow", [[3, 4, 5]], SamplingParams(max_tokens=100, ignore_eos=True))
        await slow.next()
        slow.close()   # a client gone: aborted in the child, its pages freed
        text = remote._render_chat([{"role": "user", "content": "hi"}], True)[0]
        chat = RequestGroup(thread, "chat", [text], SamplingParams(temperature=0.0, max_tokens=3),
                            add_special_tokens=False)
        return refused.value, biased.value, await chat.collect()

    refused, biased, chat = _serve(remote, go)
    assert refused.status == 400 and "max_model_len" in refused.message
    assert biased.status == 400 and biased.param == "logit_bias"
    assert chat[0].prompt_token_ids[0] == 256 and len(chat[0].outputs[0].token_ids) <= 3   # <|im_start|>
    for _ in range(50):
        stats = remote.engine.stats()
        if stats["kv_pages_free"] == stats["kv_pages_total"] and stats["num_running"] == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["num_running"] == 0


def test_a_dead_engine_process_fails_requests_not_the_server():
    llm = RemoteLLM(dict(params=_numpy(tiny_params()), config=TINY, **ENGINE_KW), start_timeout=300)

    async def go(thread):
        llm._process.kill()
        llm._process.join(10)
        group = RequestGroup(thread, "x", [[1, 2, 3]], SamplingParams(max_tokens=4))
        with pytest.raises(APIError) as failed:
            await group.collect()
        return failed.value

    try:
        failed = _serve(llm, go)
        assert failed.status == 500 and "engine process" in failed.message
        assert not llm.is_alive()
    finally:
        llm.close(timeout=5)


def test_a_model_that_fails_to_load_names_the_error():
    with pytest.raises(RuntimeError, match="no-such-model"):
        RemoteLLM(dict(model="/nonexistent/no-such-model.gguf"), start_timeout=120)


def test_a_crashing_step_fails_its_requests_and_the_process_serves_on():
    """A scripted engine in the child: a step that raises fails the requests it held with 500,
    an engine-refused prompt is a 400, a failed request a 500; later requests are served."""
    llm = RemoteLLM({}, start_timeout=120, factory="tests.serve.fakes:fake_llm")

    async def go(thread):
        results = {}
        for prompt in ("crash", "reject", "boom"):
            group = RequestGroup(thread, prompt, [prompt], SamplingParams(max_tokens=3))
            with pytest.raises(APIError) as failed:
                await group.collect()
            results[prompt] = failed.value
        groups = [RequestGroup(thread, f"ok{i}", [f"p{i}"], SamplingParams(max_tokens=2 + i % 3)) for i in range(12)]
        results["ok"] = [await g.collect() for g in groups]
        return results

    try:
        results = _serve(llm, go)
    finally:
        llm.close(timeout=10)
    assert results["crash"].status == 500 and "the step crashed" in results["crash"].message
    assert results["reject"].status == 400 and "refused" in results["reject"].message
    assert results["boom"].status == 500 and "boom" in results["boom"].message
    assert [len(outs[0].outputs[0].token_ids) for outs in results["ok"]] == [2 + i % 3 for i in range(12)]
    assert llm._process.exitcode == 0
