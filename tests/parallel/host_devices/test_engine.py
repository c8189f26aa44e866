"""The engine at TP=2 and TP=4 gives TP=1's greedy tokens (and forward_dense's), in every pipeline mode."""

from __future__ import annotations

import pytest

from nanoflow_jax.config import PIPELINES
from tests.engine.conftest import random_prompts, reference_greedy
from tests.parallel.host_devices.conftest import FEW_BUCKETS, assert_split_over, greedy_tokens

# Long enough to be chunked (the budget is 32 tokens), so batches mix prefill and decode
# and the nano-batch modes really split.
PROMPTS = random_prompts(4, lengths=[5, 40, 3, 17], seed=7)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def one_device() -> list[list[int]]:
    tokens, runner = greedy_tokens(1, PROMPTS, MAX_TOKENS)
    assert runner.tp is None
    assert tokens == reference_greedy(PROMPTS, MAX_TOKENS)
    return tokens


@pytest.mark.parametrize("size", [2, 4])
def test_tp_greedy_equals_one_device(one_device, size):
    tokens, runner = greedy_tokens(size, PROMPTS, MAX_TOKENS, pipeline="sequential")
    assert tokens == one_device
    assert_split_over(runner.cache.k, size, axis=3)
    assert_split_over(runner.params["layers"]["w_gate"], size, axis=2)


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if p != "sequential"])
def test_tp_pipelines_equal_one_device(one_device, pipeline):
    tokens, runner = greedy_tokens(2, PROMPTS, MAX_TOKENS, pipeline=pipeline)
    assert runner.pipeline == pipeline
    assert tokens == one_device


def test_random_weights_loaded_split_equal_one_device(one_device, tmp_path):
    """A model folder with weights="random" (seed 0, as tiny_params): born split over 4
    devices, each KV head kept on a group of 2, the same tokens as one device."""
    import json

    from nanoflow_jax import LLM, SamplingParams
    from tests.engine.conftest import ENGINE_KW, TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    llm = LLM(str(tmp_path), weights="random", tensor_parallel_size=4, **{**ENGINE_KW, **FEW_BUCKETS})
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert_split_over(llm.engine.runner.params["layers"]["wqkv"], 4, axis=2)
    assert [list(o.outputs[0].token_ids) for o in outs] == one_device
