"""The default model (SmolLM2-135M: 9 query heads, 3 KV heads) at TP=3 gives TP=1's greedy replies."""

from __future__ import annotations

import pytest

PROMPTS = ["What is the capital of France?", "Count from one to five:", "The opposite of hot is"]
ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(4, 64),
              num_kv_pages=40, show_progress=False)


def _replies(path: str, size: int) -> tuple[list[list[int]], object]:
    from nanoflow_jax import LLM, SamplingParams

    llm = LLM(path, tensor_parallel_size=size, **ENGINE)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs], llm.engine.runner


@pytest.mark.slow
def test_default_model_tp3_equals_one_device(default_gguf_path):
    one, _ = _replies(str(default_gguf_path), 1)
    three, runner = _replies(str(default_gguf_path), 3)
    assert runner.tp is not None and runner.tp.local_config.num_kv_heads == 1
    assert runner.cache.k.shape[3] == 3 and len(runner.cache.k.sharding.device_set) == 3
    assert three == one
