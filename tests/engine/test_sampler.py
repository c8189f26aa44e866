"""The device sampler against numpy: filters keep exactly the right tokens, in the right
proportions; greedy is argmax; a row's draw depends only on (seed, gen_index)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nanoflow_jax.engine.sampler import DRAW, GREEDY, SamplerPlan, SamplingArrays, sample

PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.02, 0.01], np.float64)
LOGITS = np.log(PROBS).astype(np.float32)
N = 20000


def expected(temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Independent numpy version of the filtered distribution (PROBS is already sorted)."""
    p = PROBS ** (1.0 / temperature)
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k > 0:
        keep[top_k:] = False
    before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    keep &= before < top_p
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


_sample = jax.jit(sample)


def draw(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
         seed: int = 7, n: int = N, logits: np.ndarray = LOGITS) -> np.ndarray:
    rows = np.broadcast_to(logits, (n, logits.shape[0]))
    p = SamplingArrays(temperature=np.full(n, temperature, np.float32), top_p=np.full(n, top_p, np.float32),
                       min_p=np.full(n, min_p, np.float32), top_k=np.full(n, top_k, np.int32),
                       seed=np.full(n, seed, np.int32), gen_index=np.arange(n, dtype=np.int32))
    return np.asarray(_sample(rows, p))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0),
    (1.0, 0, 1.0, 0.3), (1.5, 5, 0.8, 0.1)])
def test_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, min_p):
    want = expected(temperature, top_k, top_p, min_p)
    got = np.bincount(draw(temperature, top_k, top_p, min_p), minlength=len(PROBS)) / N
    assert np.all(got[want == 0] == 0), f"filtered tokens were drawn: {got}"
    sigma = np.sqrt(want * (1 - want) / N)
    assert np.all(np.abs(got - want) <= 5 * sigma + 1e-9), f"got {got}, want {want}"


def test_filters_exact_sets():
    # top_p=0.6 on PROBS keeps 0.30, 0.20, 0.15 (mass before the third is 0.50 < 0.6).
    assert set(draw(1.0, top_p=0.6)) == {0, 1, 2}
    assert set(draw(1.0, top_k=2)) == {0, 1}
    assert set(draw(1.0, min_p=0.55)) == {0, 1}       # p >= 0.165
    assert set(draw(1.0, top_p=0.01)) == {0}          # the top token always survives


def test_greedy_is_argmax_and_ignores_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32)
    p = SamplingArrays(temperature=np.zeros(64, np.float32), top_p=np.full(64, 0.1, np.float32),
                       min_p=np.zeros(64, np.float32), top_k=np.full(64, 3, np.int32),
                       seed=np.arange(64, dtype=np.int32), gen_index=np.zeros(64, np.int32))
    assert np.array_equal(np.asarray(_sample(logits, p)), logits.argmax(-1))
    # The all-greedy plan leaves the draw out and gives the same tokens.
    assert np.array_equal(np.asarray(jax.jit(sample, static_argnums=2)(logits, p, GREEDY)), logits.argmax(-1))


def test_plans_follow_the_rows_settings():
    from nanoflow_jax.engine.sample_step import plan_for
    from nanoflow_jax.engine.sampling_params import SamplingParams

    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)
    assert plan_for([greedy, greedy]) == GREEDY and plan_for([greedy, hot]) == DRAW
    assert plan_for([SamplingParams(temperature=0.0, presence_penalty=0.5)]) == SamplerPlan(penalties=True)
    assert plan_for([SamplingParams(temperature=0.0, min_tokens=3)]).penalties
    assert plan_for([greedy, SamplingParams(temperature=0.0, logprobs=0)]).logprobs == 1
    assert plan_for([SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.8, logprobs=5)]).logprobs == 2


def test_a_rows_draw_depends_only_on_its_seed_and_index():
    a = draw(1.0, seed=3, n=64)
    assert np.array_equal(a, draw(1.0, seed=3, n=64))
    assert not np.array_equal(a, draw(1.0, seed=4, n=64))
    # The same row inside a different batch (other rows, other settings) draws the same.
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(size=(5, 9)).astype(np.float32), LOGITS[None]])
    p = SamplingArrays(temperature=np.array([0, 0.5, 1, 2, 1, 1.0], np.float32),
                       top_p=np.array([1, 0.5, 1, 1, 0.9, 1.0], np.float32), min_p=np.zeros(6, np.float32),
                       top_k=np.array([0, 2, 0, 4, 0, 0], np.int32), seed=np.array([9, 8, 7, 6, 5, 3], np.int32),
                       gen_index=np.array([0, 1, 2, 3, 4, 17], np.int32))
    assert int(np.asarray(_sample(logits, p))[5]) == a[17]
