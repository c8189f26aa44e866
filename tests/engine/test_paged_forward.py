"""forward_paged over the engine's batch layout equals forward_dense.

Batches are built by the engine's own `ModelRunner.prepare` from hand-made schedules:
block tables out of order, prompt lengths that are not multiples of the page size, a
prompt split over chunks, decodes first, mixed with prefills in one batch.
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
from nanoflow_jax.models.paged import allocate_kv_cache, kv_cache_dtype
from tests.engine.conftest import TINY, _dense_logits_fn, make_llm, random_prompts, tiny_params

FP8_LOGITS_ERROR = 0.05   # relative error of a row of logits with an fp8 KV cache


@pytest.mark.parametrize("kv_dtype", ["float32", "fp8"])
def test_chunked_paged_forward_matches_dense(kv_dtype):
    """With an fp8 (e4m3) cache too: its K/V carry e4m3's rounding (3 mantissa bits), so the
    logits match the float32 reference to a few percent instead of to float32 rounding."""
    llm = make_llm()
    runner = llm.engine.runner
    params = tiny_params()
    # Full token streams: prompt plus the tokens later fed as decodes.
    tokens = random_prompts(3, [9, 15, 32], seed=3)
    tables = [[40, 3, 17], [9, 44, 2, 30], [12, 1, 35, 20, 8, 27, 46, 5]]   # out of order, disjoint
    seqs = [Sequence(request_id=str(i), arrival=i, prompt=None, prompt_token_ids=t, params=SamplingParams(),
                     seed=0, max_tokens=1, block_table=tables[i]) for i, t in enumerate(tokens)]
    a, b, c = seqs
    # (seq, start, length) per iteration; decodes (length 1, after a finished prompt) first.
    schedule = [
        [(a, 0, 5), (b, 0, 10)],
        [(a, 5, 2), (b, 10, 3), (c, 0, 16)],
        [(a, 7, 1), (b, 13, 1), (c, 16, 14)],
        [(a, 8, 1), (b, 14, 1), (c, 30, 1)],
        [(c, 31, 1)],
    ]
    dense = np.zeros((3, 128), np.int32)
    for i, t in enumerate(tokens):
        dense[i, : len(t)] = t
    want = np.asarray(_dense_logits_fn()(params, dense))
    step = jax.jit(forward_paged, static_argnames=("cfg", "kernels"), donate_argnums=(1,))
    cache = allocate_kv_cache(TINY, runner.num_pages, runner.cfg.block_size,
                              kv_cache_dtype("fp8" if kv_dtype == "fp8" else "auto", jnp.float32))
    # GPUs run f32 matmuls at reduced (TF32-like) default precision: a looser bound there.
    tol = 2e-4 if jax.default_backend() == "cpu" else 3e-3
    errors = []
    for it, plan in enumerate(schedule):
        num_decode = sum(1 for _, start, n in plan if n == 1 and start >= 7)
        rows = [ScheduledRow(q, start, n, -1, True) for q, start, n in plan]
        batch = ScheduledBatch(rows=rows, num_decode=num_decode, num_tokens=sum(n for *_, n in plan),
                               num_preempted=0)
        _, (tok, seq_i, _, query_start, block_table, nd) = runner.prepare(batch)
        logits, cache = step(params, cache, unpack_batch(tok, seq_i, query_start, block_table, nd), TINY)
        logits = np.asarray(logits)
        for r, (q, start, n) in enumerate(plan):
            ref = want[int(q.request_id), start + n - 1]
            where = f"iteration {it}, request {q.request_id}, positions {start}..{start + n}"
            if kv_dtype == "fp8":
                errors.append(np.linalg.norm(logits[r] - ref) / np.linalg.norm(ref))
                assert errors[-1] < FP8_LOGITS_ERROR, where
            else:
                np.testing.assert_allclose(logits[r], ref, atol=tol, rtol=tol, err_msg=where)
    if kv_dtype == "fp8":
        assert cache.k.dtype == jnp.float8_e4m3fn and max(errors) > 1e-4   # the cache really rounded
    # Padding only ever wrote the null page: every page nobody owns is still zero.
    owned = {p for t in tables for p in t}
    k = np.asarray(cache.k)
    unowned = [p for p in range(1, runner.num_pages) if p not in owned]
    assert not np.any(k[:, unowned])
