"""Rollout features under TP=2: penalties, logprobs and n samples give one device's
results, and update_params re-shards new weights on the mesh without compiling."""

from __future__ import annotations

import jax
import numpy as np

from nanoflow_jax import SamplingParams
from tests.engine.conftest import count_compiles, make_llm, random_prompts, reference_greedy, tiny_params
from tests.parallel.host_devices.conftest import FEW_BUCKETS, assert_split_over

PROMPTS = random_prompts(3, lengths=[5, 40, 17], seed=9)
MIXED = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, frequency_penalty=0.7, logprobs=3),
         SamplingParams(temperature=0.8, seed=4, n=2, max_tokens=6, ignore_eos=True, logprobs=0),
         SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5, logit_bias={7: 3.0})]


def _run(size: int):
    llm = make_llm(tensor_parallel_size=size, **FEW_BUCKETS)
    return llm, llm.generate(PROMPTS, MIXED, use_tqdm=False)


def test_penalties_logprobs_and_samples_equal_one_device():
    _, one = _run(1)
    _, two = _run(2)
    for a, b in zip(one, two):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for ea, eb in zip(ca.logprobs or [], cb.logprobs or []):
                assert list(ea) == list(eb)
                np.testing.assert_allclose([v.logprob for v in ea.values()], [v.logprob for v in eb.values()],
                                           atol=1e-4)


def test_update_params_reshards_on_the_mesh_without_compiling():
    llm = make_llm(tensor_parallel_size=2, **FEW_BUCKETS)
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm.generate(PROMPTS, greedy, use_tqdm=False)   # CPU: the step compiles on first use
    new = tiny_params(1)
    llm.update_params(new)   # the first update compiles the re-layout
    with count_compiles() as events:
        outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
        llm.update_params(tiny_params(0))
        back = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert events == [], events
    assert [o.outputs[0].token_ids for o in outs] == reference_greedy(PROMPTS, 5, new)
    assert [o.outputs[0].token_ids for o in back] == reference_greedy(PROMPTS, 5)
    assert_split_over(llm.engine.runner.params["layers"]["w_gate"], 2, axis=2)
    assert_split_over(llm.engine.runner.params["layers"]["wqkv"], 2, axis=2)
    assert np.isfinite(np.asarray(jax.tree_util.tree_leaves(new)[0])).all()
