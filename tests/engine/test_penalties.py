"""Penalties, logit_bias and min_tokens: the device code against numpy, and the engine's
greedy outputs against a numpy loop over forward_dense's logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.sampler import Penalties, SamplerPlan, apply_penalties
from tests.engine.conftest import IM_END, VOCAB, count_compiles, make_llm, random_prompts, tiny_params
from tests.engine.conftest import _dense_logits_fn, REF_LEN


def numpy_penalties(logits, history, prompt_len, presence, frequency, repetition, bias):
    """float64 reference of vLLM's order: logit_bias, then repetition, frequency, presence."""
    out = logits.astype(np.float64).copy()
    for r in range(out.shape[0]):
        toks = [t for t in history[r] if t >= 0]
        for t, b in bias[r].items():
            out[r, t] += b
        gen = np.bincount(toks[prompt_len[r]:], minlength=out.shape[1])
        seen = np.bincount(toks, minlength=out.shape[1]) > 0
        row = out[r]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[r], row[seen] * repetition[r])
        row -= frequency[r] * gen + presence[r] * (gen > 0)
    return out


def test_apply_penalties_matches_numpy():
    rng = np.random.default_rng(0)
    rows, vocab, width = 6, 40, 24
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    history = np.full((rows, width), -1, np.int32)
    prompt_len = rng.integers(1, 8, rows).astype(np.int32)
    for r in range(rows):
        n = int(prompt_len[r] + rng.integers(0, 12))
        history[r, :n] = rng.integers(0, 10, n)   # few distinct ids: repeats are common
    presence = np.array([0, 0.5, -1.0, 0, 2.0, 0.3], np.float32)
    frequency = np.array([0, 0.2, 0, -0.7, 1.0, 0], np.float32)
    repetition = np.array([1, 1.3, 1, 0.8, 2.0, 1], np.float32)
    bias = [{}, {3: 5.0}, {}, {1: -2.0, 39: 10.0}, {}, {}]
    bias_ids = np.full((rows, 4), -1, np.int32)
    bias_values = np.zeros((rows, 4), np.float32)
    for r, b in enumerate(bias):
        bias_ids[r, :len(b)] = list(b)
        bias_values[r, :len(b)] = list(b.values())
    pen = Penalties(presence=presence, frequency=frequency, repetition=repetition, prompt_len=prompt_len,
                    history=history, bias_ids=bias_ids, bias_values=bias_values)
    got = np.asarray(jax.jit(apply_penalties)(logits, pen))
    want = numpy_penalties(logits, history, prompt_len, presence, frequency, repetition, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[0], logits[0])   # a row without penalties is untouched
    off = Penalties(presence=np.zeros(rows, np.float32), frequency=np.zeros(rows, np.float32),
                    repetition=np.ones(rows, np.float32), prompt_len=prompt_len, history=history,
                    bias_ids=np.full((rows, 4), -1, np.int32), bias_values=bias_values)
    assert np.array_equal(np.asarray(jax.jit(apply_penalties)(logits, off)), logits)   # nothing to apply
    # A device-only last token joins the history at its column (a decode's input).
    last = dataclasses.replace(pen, last_token=np.full(rows, 7, np.int32), last_at=np.where(
        np.arange(rows) % 2 == 0, (history >= 0).sum(1), -1).astype(np.int32))
    with_last = history.copy()
    for r in range(0, rows, 2):
        with_last[r, (history[r] >= 0).sum()] = 7
    want = numpy_penalties(logits, with_last, prompt_len, presence, frequency, repetition, bias)
    np.testing.assert_allclose(np.asarray(jax.jit(apply_penalties)(logits, last)), want, rtol=1e-5, atol=1e-5)


def reference_penalized_greedy(prompt, max_tokens, sp: SamplingParams):
    """Greedy decoding with sp's penalties on forward_dense's logits, in numpy."""
    fn, seq = _dense_logits_fn(), list(prompt)
    for _ in range(max_tokens):
        batch = np.zeros((1, REF_LEN), np.int32)
        batch[0, :len(seq)] = seq
        logits = np.asarray(fn(tiny_params(), jnp.asarray(batch)))[0, len(seq) - 1][None]
        history = np.array([seq], np.int32)
        adjusted = numpy_penalties(logits, history, [len(prompt)], [sp.presence_penalty], [sp.frequency_penalty],
                                   [sp.repetition_penalty], [dict(sp.logit_bias)])
        seq.append(int(np.argmax(adjusted[0])))
    return seq[len(prompt):]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_greedy_with_penalties_matches_numpy(async_scheduling):
    prompts = random_prompts(4, [3, 9, 40, 17], seed=3)
    settings = [dict(presence_penalty=1.5), dict(frequency_penalty=0.8, logit_bias={7: 2.0}),
                dict(repetition_penalty=1.8), dict(repetition_penalty=0.7, presence_penalty=-0.5)]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, **kw) for kw in settings]
    outs = make_llm(async_scheduling=async_scheduling).generate(prompts + prompts[:1],
                                                               params + [SamplingParams(temperature=0.0, max_tokens=10,
                                                                                        ignore_eos=True)],
                                                               use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == reference_penalized_greedy(prompt, 10, sp), sp
    plain = [reference_penalized_greedy(p, 10, SamplingParams(temperature=0.0)) for p in prompts]
    assert outs[4].outputs[0].token_ids == plain[0]   # the unpenalised row beside them is unchanged
    assert sum(o.outputs[0].token_ids != q for o, q in zip(outs, plain)) >= 2   # the penalties bite


def test_logit_bias_and_min_tokens_hold_off_eos():
    llm = make_llm()
    prompt = random_prompts(1, [5], seed=4)
    # EOS is pushed to the top, but min_tokens holds it off for the first 6 tokens.
    sp = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, logit_bias={IM_END: 100.0})
    out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and IM_END not in out.token_ids[:6]
    assert out.token_ids[6] == IM_END and out.finish_reason == "stop"
    # A stop token too is held off; with a sampled draw as well.
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=12, min_tokens=4, stop_token_ids=[9],
                        logit_bias={9: 100.0})
    out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[4:] == [9] and 9 not in out.token_ids[:4] and out.stop_reason == 9
    assert llm.engine.blocks.all_free()


def test_bad_penalty_requests_fail_alone():
    llm = make_llm()
    ok = SamplingParams(temperature=0.0, max_tokens=3)
    outs = llm.generate([[1, 2], [3, 4], [5, 6]],
                        [ok, {"logit_bias": {VOCAB + 5: 1.0}}, {"logprobs": 21}], use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 3
    assert "outside the vocabulary" in outs[1].error
    assert "max_logprobs=20" in outs[2].error
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(logit_bias={"12": -3}).logit_bias == {12: -3.0}   # JSON's string keys


def test_penalties_compile_only_their_samplers_once():
    """Precompiled: greedy and drawing batches compile nothing; penalties and logprobs
    compile their small sampler when first asked for, never a forward bucket, and once."""
    llm = make_llm(precompile=True)
    runner = llm.engine.runner
    forward = dict(runner._compiled)
    prompts = random_prompts(3, [4, 30, 12], seed=6)
    with count_compiles() as events:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=4), use_tqdm=False)
    assert events == [], events
    mixed = [SamplingParams(temperature=0.0, max_tokens=6, frequency_penalty=0.5),
             SamplingParams(temperature=0.9, seed=3, max_tokens=6, repetition_penalty=1.2, logit_bias={4: 1.0}),
             SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, logprobs=2)]
    samplers = set(runner._samplers)
    first = llm.generate(prompts, mixed, use_tqdm=False)
    assert runner._compiled == forward and {plan for _, plan in set(runner._samplers) - samplers} \
        == {SamplerPlan(draw=True, penalties=True, logprobs=2)}
    with count_compiles() as events:
        again = llm.generate(prompts, mixed, use_tqdm=False)
    assert events == [], events
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
