"""A minimal greedy decoder over forward_paged (one request, fixed shapes), for model tests."""

import jax.numpy as jnp
import numpy as np

from nanoflow_jax.models.llama import forward_paged
from nanoflow_jax.models.paged import BatchInputs, allocate_kv_cache


def greedy(params, cfg, prompt_ids, max_new_tokens, page_size=16, eos_id=None):
    n_pages = (len(prompt_ids) + max_new_tokens) // page_size + 2
    cache = allocate_kv_cache(cfg, n_pages, page_size, params["embed"].dtype)
    table = np.arange(1, n_pages, dtype=np.int32)[None]

    def step(tokens, start):
        n = len(tokens)
        pos = np.arange(start, start + n, dtype=np.int32)
        batch = BatchInputs(
            token_ids=jnp.asarray(np.asarray(tokens, np.int32)), positions=jnp.asarray(pos),
            slot_mapping=jnp.asarray(table[0][pos // page_size] * page_size + pos % page_size),
            token_seq=jnp.zeros(n, jnp.int32), query_start=jnp.asarray([0, n], jnp.int32),
            query_len=jnp.asarray([n], jnp.int32), context_len=jnp.asarray([start + n], jnp.int32),
            block_table=jnp.asarray(table), logits_index=jnp.asarray([n - 1], jnp.int32),
            num_decode=jnp.asarray(int(n == 1), jnp.int32))
        return forward_paged(params, cache, batch, cfg)

    out: list[int] = []
    logits, cache = step(prompt_ids, 0)
    while len(out) < max_new_tokens:
        out.append(int(jnp.argmax(logits[0])))
        if out[-1] == eos_id:
            break
        logits, cache = step([out[-1]], len(prompt_ids) + len(out) - 1)
    return out
