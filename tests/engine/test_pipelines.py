"""The three pipeline modes serve the same greedy tokens as the dense reference.

16 mixed-length prompts over a 48-page pool: batches mix decodes with prefill chunks
longer than the 8 request rows, so the nano-batch modes split most iterations, and the
pool forces preemption. A GPU run of the same test exercises the two streams.
"""

from __future__ import annotations

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.config import EngineConfig
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LENGTHS = [1, 3, 5, 8, 13, 21, 34, 40, 45, 50, 7, 2, 33, 60, 17, 9]


@pytest.mark.parametrize("pipeline", ["nanobatch", "nanoflow"])
def test_pipeline_matches_dense_reference(pipeline):
    prompts = random_prompts(16, LENGTHS, seed=5)
    llm = make_llm(pipeline=pipeline)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.all_free()
    ref = reference_greedy(prompts, GREEDY.max_tokens)
    for i, (o, want) in enumerate(zip(outs, ref)):
        assert o.outputs[0].token_ids == want, f"prompt {i} (len {LENGTHS[i]}) in {pipeline} != dense reference"


def test_unknown_pipeline_is_refused():
    with pytest.raises(ValueError, match="pipeline must be one of"):
        EngineConfig(pipeline="overlap")

