"""A minimal greedy decoder over forward_paged (one request, fixed shapes), for model tests."""

import jax.numpy as jnp
import numpy as np

from nanoflow_jax.models.llama import forward_paged
from nanoflow_jax.models.paged import allocate_kv_cache
from tests.models.batching import pack_batch


def greedy(params, cfg, prompt_ids, max_new_tokens, page_size=16, eos_id=None):
    n_pages = (len(prompt_ids) + max_new_tokens) // page_size + 2
    cache = allocate_kv_cache(cfg, n_pages, page_size, params["embed"].dtype)
    table = np.arange(1, n_pages, dtype=np.int32)

    def step(start, n):
        tokens = np.asarray(list(prompt_ids) + out, np.int32)
        return forward_paged(params, cache, pack_batch([(tokens, start, n, table)], page_size, T=n, S=1, W=table.size), cfg)

    out: list[int] = []
    logits, cache = step(0, len(prompt_ids))
    while len(out) < max_new_tokens:
        out.append(int(jnp.argmax(logits[0])))
        if out[-1] == eos_id:
            break
        logits, cache = step(len(prompt_ids) + len(out) - 1, 1)
    return out
