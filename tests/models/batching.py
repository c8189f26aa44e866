"""Packs requests into one padded BatchInputs by hand (independent of the engine's packer)."""

import jax.numpy as jnp
import numpy as np

from nanoflow_jax.models.paged import BatchInputs


def pack_batch(reqs, page_size, T, S, W):
    """reqs: list of (tokens, start, n, block_table). Packs them into one padded BatchInputs."""
    tok, pos, slot, seq = (np.zeros(T, np.int32) for _ in range(4))
    qs, ql, cl = np.zeros(S + 1, np.int32), np.zeros(S, np.int32), np.zeros(S, np.int32)
    bt, li = np.zeros((S, W), np.int32), np.zeros(S, np.int32)
    off = 0
    for r, (tokens, start, n, table) in enumerate(reqs):
        p = np.arange(start, start + n)
        tok[off:off + n], pos[off:off + n], seq[off:off + n] = tokens[start:start + n], p, r
        slot[off:off + n] = np.asarray(table)[p // page_size] * page_size + p % page_size
        ql[r], cl[r], li[r] = n, start + n, off + n - 1
        bt[r, :len(table)] = table
        off += n
        qs[r + 1] = off
    qs[len(reqs) + 1:] = off
    arrays = dict(token_ids=tok, positions=pos, slot_mapping=slot, token_seq=seq, query_start=qs,
                  query_len=ql, context_len=cl, block_table=bt, logits_index=li)
    return BatchInputs(**{k: jnp.asarray(v) for k, v in arrays.items()},
                       num_decode=jnp.asarray(sum(1 for r in reqs if r[2] == 1)))
