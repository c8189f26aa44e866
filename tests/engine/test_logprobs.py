"""Logprobs are the model's: the engine's sampled-token and top-k logprobs against
log_softmax(forward_dense) in f32; prompt_logprobs; metrics; stop-string options."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.sequence import Logprob
from tests.engine.conftest import IM_END, REF_LEN, _dense_logits_fn, make_llm, random_prompts, tiny_params

TOL = 1e-4


def dense_logprobs(tokens: list[int]) -> np.ndarray:
    """log_softmax of forward_dense over `tokens` (float64 after the f32 forward), [len, V]."""
    batch = np.zeros((1, REF_LEN), np.int32)
    batch[0, :len(tokens)] = tokens
    logits = np.asarray(_dense_logits_fn()(tiny_params(), jnp.asarray(batch)))[0, :len(tokens)].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def check_entry(entry: dict[int, Logprob], token: int, ref: np.ndarray, k: int) -> None:
    assert next(iter(entry)) == token, "the chosen token comes first"
    assert abs(entry[token].logprob - ref[token]) < TOL
    assert entry[token].rank == 1 + int(np.sum(ref > ref[token] + 1e-6))
    top = np.argsort(-ref)[:k]
    assert set(top.tolist()) <= set(entry) and len(entry) <= k + 1
    for j, t in enumerate(top):
        assert abs(entry[int(t)].logprob - ref[t]) < TOL
        if int(t) != token:
            assert entry[int(t)].rank == j + 1


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_sampled_token_logprobs_equal_dense_log_softmax(async_scheduling):
    prompts = random_prompts(5, [3, 17, 40, 8, 33], seed=11)
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=9, logprobs=k, ignore_eos=True,
                             repetition_penalty=1.3 if i == 1 else 1.0)   # logprobs come before penalties
              for i, k in enumerate([0, 5, 1, 20, 3])]
    outs = make_llm(async_scheduling=async_scheduling).generate(prompts, params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, outs):
        comp = out.outputs[0]
        ref = dense_logprobs(prompt + comp.token_ids)
        assert len(comp.logprobs) == len(comp.token_ids) == 9
        total = 0.0
        for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            check_entry(entry, tok, ref[len(prompt) - 1 + i], sp.logprobs)
            total += ref[len(prompt) - 1 + i][tok]
        assert abs(comp.cumulative_logprob - total) < 1e-3
        assert out.prompt_logprobs is None


def test_prompt_logprobs_and_no_logprobs_by_default():
    prompt = random_prompts(1, [21], seed=12)[0]
    llm = make_llm()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=4),
                       use_tqdm=False)[0]
    ref = dense_logprobs(prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        check_entry(out.prompt_logprobs[j], prompt[j], ref[j - 1], 4)
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None


def test_metrics_are_ordered_times():
    out = make_llm().generate(random_prompts(2, [5, 9]), SamplingParams(max_tokens=4), use_tqdm=False)[1]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)


def test_stop_string_options_and_decoded_tokens(tokenizer):
    llm = make_llm(tokenizer=tokenizer)
    sp = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = llm.generate(["hello"], SamplingParams(**sp), use_tqdm=False)[0].outputs[0].text
    stop = base[3:5]
    cut = llm.generate(["hello"], SamplingParams(stop=[stop], **sp), use_tqdm=False)[0].outputs[0]
    kept = llm.generate(["hello"], SamplingParams(stop=[stop], include_stop_str_in_output=True, **sp),
                        use_tqdm=False)[0].outputs[0]
    at = base.index(stop)
    assert cut.text == base[:at] and kept.text == base[:at + len(stop)]
    # skip_special_tokens=False keeps <|im_end|> in the text; logprobs carry each token's text.
    forced = dict(temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={IM_END: 100.0}, logprobs=1)
    shown = llm.generate(["hi"], SamplingParams(skip_special_tokens=False, **forced), use_tqdm=False)[0].outputs[0]
    hidden = llm.generate(["hi"], SamplingParams(**forced), use_tqdm=False)[0].outputs[0]
    assert shown.text == "<|im_end|>" * 3 and hidden.text == ""
    assert shown.logprobs[0][IM_END].decoded_token == "<|im_end|>"
