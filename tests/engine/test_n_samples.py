"""n > 1: samples of one prompt share its full KV pages (reference counted), recompute the
last partial page, draw from their own seed streams, and leak no page on any path."""

from __future__ import annotations

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.llm_engine import sample_seed
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

BS = 4   # ENGINE_KW's block_size


def test_greedy_samples_all_match_the_dense_reference_under_preemption():
    prompts = random_prompts(5, [13, 40, 30, 9, 22], seed=31)
    llm = make_llm()
    sp = SamplingParams(temperature=0.0, n=4, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    ref = reference_greedy(prompts, 24)
    assert llm.engine.scheduler.num_preemptions > 0   # 20 sequences do not fit 47 pages at once
    for out, want in zip(outs, ref):
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        assert all(c.token_ids == want and c.finish_reason == "length" for c in out.outputs)
    assert llm.engine.blocks.all_free()


def test_each_sample_draws_from_its_own_seed_stream():
    prompt = random_prompts(1, [14], seed=32)
    llm = make_llm()
    kw = dict(temperature=1.0, max_tokens=8, ignore_eos=True, logprobs=1)
    together = llm.generate(prompt, SamplingParams(n=3, seed=123, **kw), use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(seed=sample_seed(123, i), **kw), use_tqdm=False)[0].outputs[0]
             for i in range(3)]
    assert [c.token_ids for c in together.outputs] == [a.token_ids for a in alone]
    assert len({tuple(c.token_ids) for c in together.outputs}) > 1
    for c, a in zip(together.outputs, alone):
        assert c.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-4)
    assert llm.engine.blocks.all_free()


def test_samples_share_the_leaders_full_prompt_pages():
    llm = make_llm()
    engine = llm.engine
    prompt = random_prompts(1, [14], seed=33)[0]   # pages 0-2 full; the last token sits in page 3
    engine.add_request(prompt, SamplingParams(temperature=0.0, n=3, max_tokens=6, ignore_eos=True), request_id="r")
    leader = engine._seqs["r"]
    for _ in range(3):
        engine.step()
    shared = leader.block_table[:(len(prompt) - 1) // BS]
    assert len(shared) == 3
    for sib in leader.group[1:]:
        assert sib.block_table[:3] == shared and sib.block_table[3] != leader.block_table[3]
    assert all(engine.blocks.refcount(p) == 3 for p in shared)
    last = None
    while engine.has_unfinished():
        for out in engine.step():
            last = out
    assert last.finished and len(last.outputs) == 3
    assert engine.blocks.all_free()


def test_abort_and_a_closed_stream_free_every_page():
    llm = make_llm()
    stream = llm.stream(random_prompts(2, [18, 7], seed=34), SamplingParams(n=3, max_tokens=30, ignore_eos=True))
    first = next(stream)
    assert len(first.outputs) == 3
    stream.close()
    assert not llm.engine.has_unfinished() or llm.engine.scheduler.running == []
    assert llm.engine.blocks.all_free()
    engine = llm.engine
    engine.add_request([1, 2, 3, 4, 5, 6, 7], SamplingParams(n=2, max_tokens=9), request_id="a")
    engine.step()
    out = engine.abort("a")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.all_free()


def test_one_update_per_request_per_step_and_deltas_add_up():
    prompts = random_prompts(2, [9, 17], seed=34)
    llm = make_llm()
    engine = llm.engine
    sp = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10, ignore_eos=True)
    for j, p in enumerate(prompts):
        engine.add_request(p, sp, request_id=f"g{j}")
    streamed: dict[tuple[str, int], list[int]] = {}
    finals = {}
    while engine.has_unfinished():
        outs = engine.step()
        ids = [o.request_id for o in outs]
        assert len(ids) == len(set(ids))   # the samples that stepped share one update
        for o in outs:
            for c in o.outputs:
                streamed.setdefault((o.request_id, c.index), []).extend(c.delta_token_ids)
            if o.finished:
                finals[o.request_id] = o
    assert sorted(finals) == ["g0", "g1"]
    for rid, o in finals.items():
        assert [c.index for c in o.outputs] == [0, 1, 2]
        for c in o.outputs:
            assert len(c.token_ids) == 10 and streamed[(rid, c.index)] == c.token_ids
    assert engine.blocks.all_free()
