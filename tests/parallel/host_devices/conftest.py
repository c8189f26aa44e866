"""Shared pieces of the multi-device tests (run with 4 host CPU devices: see ../conftest.py)."""

from __future__ import annotations

from typing import Any

import jax

from tests.engine.conftest import TINY, make_llm, tiny_params


# One step bucket (32 tokens, full block-table width) instead of twelve: every engine here
# compiles once. Decodes are padded to 32 tokens, so the nano-batch modes always split.
FEW_BUCKETS = dict(token_buckets=(32,), block_table_buckets=(32,))


def greedy_tokens(tensor_parallel_size: int, prompts: list[list[int]], max_tokens: int,
                  **engine: Any) -> tuple[list[list[int]], Any]:
    """Greedy continuations from the tiny model's engine at this TP size, and its runner."""
    from nanoflow_jax import SamplingParams

    llm = make_llm(tensor_parallel_size=tensor_parallel_size, **{**FEW_BUCKETS, **engine})
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert all(o.error is None for o in outs)
    return [list(o.outputs[0].token_ids) for o in outs], llm.engine.runner


def assert_split_over(array: jax.Array, devices: int, axis: int) -> None:
    """The array lies on `devices` devices, split along `axis` (so TP really ran sharded)."""
    shards = array.addressable_shards
    assert len({s.device for s in shards}) == devices
    assert shards[0].data.shape[axis] * devices == array.shape[axis]


__all__ = ["TINY", "FEW_BUCKETS", "tiny_params", "greedy_tokens", "assert_split_over"]
