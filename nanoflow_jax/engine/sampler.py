"""Batched token sampling on the device, inside the iteration's jitted step.

Every row carries its own settings, so one compiled function serves any mix of greedy and
sampled requests. Row r's randomness is `fold_in(PRNGKey(seed_r), gen_index_r)`, where
gen_index is the index of the output token being drawn: a seeded request draws the same
tokens whatever else is in the batch, and again after a preemption recomputes it.

Penalties, `logit_bias` and `min_tokens` (vLLM's meanings) adjust the logits before the
draw, from each row's token history. Log-probabilities are taken from the raw logits,
before any adjustment. What a batch needs (a draw, penalties, log-probabilities) is known
on the host and chosen by a static `SamplerPlan`, never by a `lax.cond`: on a GPU a
conditional reads its predicate back to the host, which holds the host's dispatch until
the device reaches it and so serializes the asynchronous pipeline.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """The work a batch's rows ask of the sampler (hashable: a static argument)."""

    draw: bool = False        # some row samples (temperature > 0): the full-vocabulary sort
    penalties: bool = False   # some row has penalties, a logit bias or blocked stop tokens
    logprobs: int = 0         # 0: none; 1: the sampled token's; 2: also the top ones


GREEDY = SamplerPlan()
DRAW = SamplerPlan(draw=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling settings, each [S] (padding rows: greedy)."""

    temperature: jax.Array  # f32; 0 = greedy
    top_p: jax.Array        # f32; 1 = off
    min_p: jax.Array        # f32; 0 = off
    top_k: jax.Array        # int32; <= 0 = off
    seed: jax.Array         # int32 (a uint32 seed's bits)
    gen_index: jax.Array    # int32; index of the output token drawn
    penalties: "Penalties | None" = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Penalties:
    """Per-row logit adjustments. Rows with presence = frequency = 0, repetition = 1 and no
    bias entry are left alone; a batch without any such row does no work at all."""

    presence: jax.Array     # [S] f32, subtracted once from each generated token's logit
    frequency: jax.Array    # [S] f32, subtracted per occurrence in the generated tokens
    repetition: jax.Array   # [S] f32, on every prompt or generated token: l / r if l > 0 else l * r
    prompt_len: jax.Array   # [S] int32: history[:, :prompt_len] is the prompt
    history: jax.Array      # [S, H] int32: the prompt, then the generated tokens; -1 pads
    bias_ids: jax.Array     # [S, A] int32: tokens whose logit gets bias_values added; -1 pads
    bias_values: jax.Array  # [S, A] f32 (logit_bias; -inf blocks a stop token under min_tokens)
    # Optional: a token known only on the device (a decode's input, sampled by the step in
    # flight) that joins the history at column last_at (< 0: none).
    last_token: jax.Array | None = None   # [S] int32
    last_at: jax.Array | None = None      # [S] int32


def apply_penalties(logits: jax.Array, pen: Penalties) -> jax.Array:
    """vLLM's order: logit_bias and min_tokens first, then repetition, frequency, presence.

    Works on each row's history sorted by token id, so its scratch is [S, H] rather than
    [S, vocab]: each distinct token's logit is gathered once, adjusted by its generated
    count and written back. Rows without settings come out unchanged (`sample` skips all
    of it when its plan has no penalties)."""
    rows_n, vocab = logits.shape
    rows = jnp.arange(rows_n)[:, None]
    logits = logits.astype(jnp.float32)
    # Out-of-range ids (the -1 padding, remapped to `vocab`) are dropped by the scatters.
    bias_ids = jnp.where(pen.bias_ids >= 0, pen.bias_ids, vocab)
    logits = logits.at[rows, bias_ids].add(pen.bias_values, mode="drop")
    history, width = pen.history, pen.history.shape[1]
    if pen.last_token is not None:
        at = jnp.where(pen.last_at >= 0, pen.last_at, width)   # negative: dropped, not wrapped
        history = history.at[jnp.arange(rows_n), at].set(pen.last_token, mode="drop")
    generated = jnp.arange(width)[None, :] >= pen.prompt_len[:, None]
    key = jnp.where(history >= 0, history, vocab)
    order = jnp.argsort(key, axis=1)
    tokens = jnp.take_along_axis(key, order, axis=1)
    gen = jnp.take_along_axis(generated, order, axis=1) & (tokens < vocab)
    first = jnp.concatenate([jnp.ones((rows_n, 1), bool), tokens[:, 1:] != tokens[:, :-1]], axis=1)
    run = jnp.cumsum(first, axis=1) - 1   # which distinct token each sorted place belongs to
    counts = jnp.zeros((rows_n, width), jnp.float32).at[rows, run].add(gen.astype(jnp.float32))
    count = jnp.take_along_axis(counts, run, axis=1)
    value = jnp.take_along_axis(logits, jnp.minimum(tokens, vocab - 1), axis=1)
    rep = pen.repetition[:, None]
    value = jnp.where(value > 0, value / rep, value * rep)
    value = value - pen.frequency[:, None] * count - pen.presence[:, None] * (count > 0)
    write = jnp.where(first & (tokens < vocab), tokens, vocab)   # once per distinct token
    return logits.at[rows, write].set(value, mode="drop")


def token_logprobs(logits: jax.Array, tokens: jax.Array, num_top: int,
                   want_top: bool = True) -> tuple[jax.Array, jax.Array]:
    """Raw log-probabilities: (f32 [S, 1 + num_top]: the token's, then the top ones;
    int32 [S, 1 + num_top]: the token's rank (1 = most likely), then the top ids).
    `want_top` False skips the top-k over the vocabulary (zeros in its place)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)
    rank = 1 + jnp.sum(lp > chosen, axis=-1, keepdims=True, dtype=jnp.int32)
    if want_top:
        top_lp, top_ids = jax.lax.top_k(lp, num_top)
    else:
        rows = lp.shape[0]
        top_lp, top_ids = jnp.zeros((rows, num_top), jnp.float32), jnp.zeros((rows, num_top), jnp.int32)
    return jnp.concatenate([chosen, top_lp], axis=1), jnp.concatenate([rank, top_ids.astype(jnp.int32)], axis=1)


def sampling_arrays_np(num_rows: int) -> SamplingArrays:
    """Host buffers for one batch, filled row by row by the model runner."""
    return SamplingArrays(
        temperature=np.zeros(num_rows, np.float32), top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32), top_k=np.zeros(num_rows, np.int32),
        seed=np.zeros(num_rows, np.int32), gen_index=np.zeros(num_rows, np.int32))


def filtered_logits(logits: jax.Array, p: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """Temperature-scaled logits sorted descending, with filtered-out entries at -inf.

    Returns (masked sorted logits [S, V], the vocabulary id at each sorted place [S, V]).
    One descending sort serves all three filters: top-k keeps the first k places, top-p
    the shortest prefix whose mass reaches p, min-p the places with prob >= min_p * max.
    """
    vocab = logits.shape[-1]
    temp = jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    scaled = logits.astype(jnp.float32) / temp
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    place = jnp.arange(vocab)[None, :]

    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)[:, None]
    keep = place < k
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each place: a place is kept while that mass is < top_p, so
    # the token that crosses top_p is included and the first place always survives.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < p.top_p[:, None]
    keep &= probs >= p.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    return jnp.where(keep, sorted_logits, -jnp.inf), order


def sample(logits: jax.Array, p: SamplingArrays, plan: SamplerPlan = DRAW) -> jax.Array:
    """One token per row: argmax where temperature == 0, else a filtered categorical draw,
    both after the row's penalties when `plan.penalties` (then `p.penalties` is needed).
    `plan.draw` False: every row is greedy and the full-vocabulary sort (milliseconds on
    a 128k vocabulary) is left out."""
    if plan.penalties:
        logits = apply_penalties(logits, p.penalties)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not plan.draw:
        return greedy
    masked, order = filtered_logits(logits, p)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(p.seed, p.gen_index)
    place = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked)
    drawn = jnp.take_along_axis(order, place[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(p.temperature > 0, drawn, greedy)
