"""The nano-batch forward equals the sequential one: same logits, same cache, on both kernel sets.

Batches come from the engine's own packing of random schedules (decodes first, prefill
chunks after, block tables out of order), so the split after the request rows meets
decode rows, prefill chunks that straddle it and padding. On a GPU the `nanoflow` case
runs its nano-batches on two streams; on CPU streams are ignored and it runs the same graph.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.engine.model_runner import unpack_batch
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.scheduler import ScheduledBatch, ScheduledRow
from nanoflow_jax.engine.sequence import Sequence
from nanoflow_jax.models.llama import forward_paged
from nanoflow_jax.models.nanobatch import forward_nanobatch, forward_pipeline, nano_split
from nanoflow_jax.models.ops import get_ops, programs_key
from nanoflow_jax.models.paged import allocate_kv_cache
from tests.engine.conftest import TINY, make_llm, tiny_params


def _random_schedule(rng: np.random.Generator, num_pages: int, rows: int, budget: int):
    """One batch: some decode rows (context 3..40), then prefill chunks, under the token budget."""
    pages = rng.permutation(np.arange(1, num_pages))
    n_dec = int(rng.integers(0, rows))
    plan, used, cursor = [], 0, 0
    for r in range(rows):
        ctx = int(rng.integers(3, 40))
        n = 1 if r < n_dec else int(rng.integers(1, max(2, budget - used - (rows - r - 1))))
        n = min(n, budget - used - (rows - r - 1))
        if n < 1:
            break
        start = ctx if r < n_dec else int(rng.integers(0, ctx))
        width = -(-(start + n) // 4)
        table = [int(p) for p in pages[cursor:cursor + width]]
        cursor += width
        seq = Sequence(request_id=str(r), arrival=r, prompt=None, prompt_token_ids=rng.integers(0, TINY.vocab_size, start + n).tolist(),
                       params=SamplingParams(), seed=0, max_tokens=1, block_table=table)
        plan.append(ScheduledRow(seq, start, n, -1, True))
        used += n
    num_decode = min(n_dec, len(plan))
    return ScheduledBatch(rows=plan, num_decode=num_decode, num_tokens=used, num_preempted=0)


def _packed(seed: int, rows: int, budget: int):
    """A random schedule packed by the engine's runner: (runner, schedule, BatchInputs)."""
    runner = make_llm().engine.runner
    batch = _random_schedule(np.random.default_rng(seed), runner.num_pages, rows=rows, budget=budget)
    _, (tok, seq_i, _, qs, bt, nd) = runner.prepare(batch)
    return runner, batch, unpack_batch(tok, seq_i, qs, bt, nd)


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_nanobatch_forward_matches_sequential(kernels):
    llm = make_llm()
    runner = llm.engine.runner
    params, ops = tiny_params(), get_ops(kernels)
    rng = np.random.default_rng()
    seq_step = jax.jit(forward_paged, static_argnames=("cfg", "kernels"))
    nano_step = jax.jit(forward_nanobatch, static_argnames=("cfg", "ops", "split", "overlap"))
    # GPUs run f32 matmuls at reduced (TF32-like) default precision: a looser bound there.
    tol = 2e-5 if jax.default_backend() == "cpu" else 3e-3
    checked = 0
    for trial in range(6):
        batch = _random_schedule(rng, runner.num_pages, rows=int(rng.integers(2, 8)), budget=32)
        _, (tok, seq_i, _, qs, bt, nd) = runner.prepare(batch)
        inputs = unpack_batch(tok, seq_i, qs, bt, nd)
        split = nano_split(inputs.num_tokens, inputs.num_seqs)
        if split is None:
            continue
        cache = allocate_kv_cache(TINY, runner.num_pages, runner.cfg.block_size)
        cache = jax.tree.map(lambda a: jax.random.normal(jax.random.key(trial), a.shape, a.dtype), cache)
        want_logits, want_cache = seq_step(params, cache, inputs, TINY, ops)
        for overlap in (False, True):
            logits, got = nano_step(params, cache, inputs, TINY, (ops, ops), split, overlap)
            np.testing.assert_allclose(np.asarray(logits)[:len(batch.rows)], np.asarray(want_logits)[:len(batch.rows)],
                                       rtol=tol, atol=tol, err_msg=f"trial {trial}, overlap={overlap}")
            np.testing.assert_allclose(np.asarray(got.k), np.asarray(want_cache.k), rtol=tol, atol=tol)
            np.testing.assert_allclose(np.asarray(got.v), np.asarray(want_cache.v), rtol=tol, atol=tol)
        checked += 1
    assert checked >= 3  # most random batches outgrow their request rows


def test_sequential_pipeline_and_small_batches_take_forward_paged():
    # A batch no longer than its rows has nothing to split: every pipeline runs it whole.
    assert nano_split(8, 8) is None and nano_split(32, 8) == 8
    runner, _, inputs = _packed(seed=1, rows=3, budget=3)
    cache = allocate_kv_cache(TINY, runner.num_pages, runner.cfg.block_size)
    want, _ = forward_paged(tiny_params(), cache, inputs, TINY, "xla")
    # CPU buckets start at one token, so this batch fits its rows and runs unsplit (the
    # same program: equal to the bit); a GPU's 16-token bucket outgrows 8 rows and splits.
    unsplit = nano_split(inputs.num_tokens, inputs.num_seqs) is None
    assert unsplit or jax.default_backend() != "cpu"
    for pipeline in ("nanobatch", "nanoflow"):
        got, _ = forward_pipeline(tiny_params(), cache, inputs, TINY, "xla", pipeline)
        if unsplit:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-3, atol=3e-3)
    with pytest.raises(ValueError, match="pipeline must be one of"):
        forward_pipeline(tiny_params(), cache, inputs, TINY, "xla", "overlapped")


def test_token_slice_keeps_decode_rows_whole():
    _, _, inputs = _packed(seed=2, rows=4, budget=32)
    s = inputs.num_seqs
    a, b = inputs.token_slice(0, s), inputs.token_slice(s, inputs.num_tokens)
    assert (a.prefill_only, b.prefill_only) == (False, True)
    assert a.num_tokens + b.num_tokens == inputs.num_tokens and b.num_seqs == s
    np.testing.assert_array_equal(np.concatenate([a.positions, b.positions]), inputs.positions)
    with pytest.raises(ValueError, match="starts at 0 or at num_seqs"):
        inputs.token_slice(1, inputs.num_tokens)
    with pytest.raises(ValueError, match="not inside"):
        inputs.token_slice(0, inputs.num_tokens + 1)


def test_nano_batches_on_their_own_sm_budgets_match_sequential():
    runner, batch, inputs = _packed(seed=4, rows=4, budget=32)
    assert nano_split(inputs.num_tokens, inputs.num_seqs) is not None
    cache = allocate_kv_cache(TINY, runner.num_pages, runner.cfg.block_size)
    want, _ = jax.jit(forward_paged, static_argnames=("cfg", "kernels"))(tiny_params(), cache, inputs, TINY, "pallas")
    budgets = (programs_key({"gemm": 1, "decode_attention": 2}), programs_key({"gemm": 3, "prefill_attention": 1}))
    step = jax.jit(forward_pipeline, static_argnames=("cfg", "kernels", "pipeline", "nano_programs"))
    got, _ = step(tiny_params(), cache, inputs, TINY, "pallas", "nanoflow", budgets)
    tol = 2e-5 if jax.default_backend() == "cpu" else 3e-3
    rows = len(batch.rows)
    np.testing.assert_allclose(np.asarray(got)[:rows], np.asarray(want)[:rows], rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="takes an SM budget"):
        programs_key({"attention": 4})
