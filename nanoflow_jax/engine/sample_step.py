"""The sampler's own jitted step, dispatched right after the forward's.

The forward step (`model_runner`) ends at the logits; this step turns them into each row's
token and, where asked, its log-probabilities. It is separate so that the work a batch
asks for (`SamplerPlan`: a draw or greedy only, penalties, log-probabilities) is chosen on
the host by picking a compiled sampler, small and quick to compile, rather than on the
device by a conditional, which on a GPU stalls the host's dispatch until the device
reaches it; and so that the forward buckets compile once for every plan.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nanoflow_jax.engine.sampler import Penalties, SamplerPlan, SamplingArrays, sample, token_logprobs
from nanoflow_jax.parallel.sharding import TensorParallel


def plan_for(params: Sequence[Any]) -> SamplerPlan:
    """The plan covering every row's `SamplingParams`."""
    logprobs = [sp.logprobs for sp in params if sp.logprobs is not None]
    return SamplerPlan(draw=any(not sp.greedy for sp in params),
                       penalties=any(sp.uses_penalties for sp in params),
                       logprobs=0 if not logprobs else 2 if max(logprobs) > 0 else 1)


def _penalties(pen: jax.Array, seq_i: jax.Array, seq_f: jax.Array, last_token: jax.Array) -> Penalties:
    """The packed penalty inputs; the row's last input token joins its history here, on
    the device, because a decode's input may be the in-flight iteration's sample."""
    context_len, gen_index = seq_i[1], seq_i[5]
    return Penalties(presence=seq_f[3], frequency=seq_f[4], repetition=seq_f[5],
                     prompt_len=context_len - gen_index, history=pen[0], bias_ids=pen[1],
                     bias_values=jax.lax.bitcast_convert_type(pen[2], jnp.float32),
                     last_token=last_token, last_at=context_len - 1)


def sample_step(logits: jax.Array, last_token: jax.Array, seq_i: jax.Array, seq_f: jax.Array,
                pen: jax.Array | None, *, plan: SamplerPlan, num_logprobs: int, max_num_seqs: int,
                tp: TensorParallel | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (tokens [max_num_seqs], (logprobs f32, ids int32) [S, 1 + num_logprobs]).

    The token array is always max_num_seqs long, so the next forward step's prev_tokens has
    one shape for every bucket. `pen` ([PEN_FIELDS, S, max_model_len]) only with plan.penalties."""
    penalties = _penalties(pen, seq_i, seq_f, last_token) if plan.penalties else None
    p = SamplingArrays(temperature=seq_f[0], top_p=seq_f[1], min_p=seq_f[2], top_k=seq_i[3], seed=seq_i[4],
                       gen_index=seq_i[5], penalties=penalties)
    tokens = sample(logits, p, plan)
    rows = tokens.shape[0]
    if plan.logprobs:
        logprobs = token_logprobs(logits, tokens, num_logprobs, want_top=plan.logprobs > 1)
    else:
        logprobs = (jnp.zeros((rows, num_logprobs + 1), jnp.float32), jnp.zeros((rows, num_logprobs + 1), jnp.int32))
    out = jnp.zeros((max_num_seqs,), jnp.int32).at[:rows].set(tokens)
    if tp is not None:  # on every device, as the next step takes prev_tokens
        out = jax.lax.with_sharding_constraint(out, tp.replicated)
    return out, logprobs
