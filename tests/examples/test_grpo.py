"""examples/grpo.py runs two steps on the default model: the engine's logprobs of the
sampled tokens match the trainer's forward, the weights move, and step 2 compiles nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import count_compiles


@pytest.mark.slow
def test_two_grpo_steps(default_gguf_path):
    # By path: inside the test tree, `examples` names this test folder.
    spec = importlib.util.spec_from_file_location("grpo_example", Path(__file__).parents[2] / "examples" / "grpo.py")
    grpo = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    steps = grpo.train(str(default_gguf_path), steps=2, n=4, max_tokens=6, prompts=grpo.PROMPTS[:2])
    first = next(steps)
    with count_compiles() as events:   # rollouts, the train step and update_params, all warm
        second = next(steps)
    assert events == [], f"step 2 compiled: {events}"
    for s in (first, second):
        # f32 on CPU: the paged engine and the dense trainer differ only by summation order.
        assert s.max_logprob_gap < 1e-3, s
        assert s.update_norm > 0 and 0.0 <= s.mean_reward <= 1.0
    # Step 2's rollouts ran on step 1's updated weights, and still matched the trainer's
    # forward on those weights: the update reached the engine.
    assert second.max_logprob_gap < 1e-3
