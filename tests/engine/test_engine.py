"""End-to-end engine tests on a tiny random model, against independent references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nanoflow_jax import LLM, SamplingParams
from nanoflow_jax.engine import RequestError
from tests.engine.conftest import (ENGINE_KW, IM_END, TINY, count_compiles, make_llm, random_prompts,
                                   reference_greedy, tiny_params)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Mixed lengths; several exceed the 32-token chunk, so their prefill spans iterations.
LENGTHS = [1, 3, 5, 8, 13, 21, 34, 40, 45, 50, 7, 2, 33, 60, 17, 9]


@pytest.fixture(scope="module")
def prompts16() -> list[list[int]]:
    return random_prompts(16, LENGTHS, seed=1)


@pytest.fixture(scope="module")
def reference16(prompts16: list[list[int]]) -> list[list[int]]:
    return reference_greedy(prompts16, GREEDY.max_tokens)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_batching_invariance_matches_dense_reference(prompts16, reference16, async_scheduling):
    llm = make_llm(async_scheduling=async_scheduling)
    together = llm.generate(prompts16, GREEDY)
    # 16 requests of up to 72 tokens do not fit 47 pages of 4: the scheduler must preempt.
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.all_free()
    alone = [llm.generate([p], GREEDY)[0] for p in prompts16]
    for i, (t, a, ref) in enumerate(zip(together, alone, reference16)):
        assert t.prompt_token_ids == prompts16[i]
        assert t.outputs[0].token_ids == ref, f"prompt {i} (len {LENGTHS[i]}) batched != dense reference"
        assert a.outputs[0].token_ids == ref, f"prompt {i} alone != dense reference"
        assert t.outputs[0].finish_reason == "length"


def test_async_and_sync_give_identical_greedy_outputs(prompts16):
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[7, 9, 11])
    a = make_llm(async_scheduling=True).generate(prompts16, params)
    s = make_llm(async_scheduling=False).generate(prompts16, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in s]
    assert [o.outputs[0].finish_reason for o in a] == [o.outputs[0].finish_reason for o in s]


def test_async_switch_follows_environment(monkeypatch):
    from nanoflow_jax.engine.config import EngineConfig

    monkeypatch.setenv("NANOFLOW_ASYNC", "0")
    assert EngineConfig().async_scheduling is False
    monkeypatch.setenv("NANOFLOW_ASYNC", "1")
    assert EngineConfig().async_scheduling is True


def test_no_compilation_during_serving():
    llm = make_llm(params=tiny_params(), async_scheduling=True, precompile=True)
    prompts = random_prompts(12, [1, 2, 31, 32, 33, 64, 100, 5, 70, 9, 3, 20], seed=5)
    mixed = [SamplingParams(temperature=0.0 if i % 2 else 0.8, top_k=5 * (i % 3), top_p=0.9,
                            max_tokens=20, seed=i) for i in range(12)]
    with count_compiles() as events:
        llm.generate(prompts, mixed)
        llm.generate(prompts[:1], mixed[0])
    assert events == [], f"serving traced or compiled: {events}"
    with count_compiles() as events:   # the counter itself sees a fresh compile
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))
    assert events


def test_cpu_compiles_buckets_on_first_use_down_to_one_token(prompts16, reference16):
    """On CPU (XLA ops) nothing compiles at start-up and a lone decode runs in a 1-token
    bucket, not one padded to 16; the greedy tokens still match the dense reference."""
    llm = make_llm(params=tiny_params())
    runner = llm.engine.runner
    assert runner._compiled == {} and runner.token_buckets[0] == 1
    out = llm.generate(prompts16[:1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference16[0][:6]
    assert any(t == 1 for t, _, _ in runner._compiled)  # the decode steps
    assert len(runner._compiled) < len(runner.token_buckets) * len(runner.width_buckets)
    assert make_llm(precompile=True, min_token_bucket=16).engine.runner.token_buckets[0] == 16


def test_stop_token_ids_max_tokens_and_eos(prompts16):
    llm = make_llm()
    prompt = prompts16[7]
    ref = reference_greedy([prompt], 30)[0]
    stop_tok = ref[6]
    first = ref.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok]))[0]
    assert out.outputs[0].token_ids == ref[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop_tok)

    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref[:5] and out.outputs[0].finish_reason == "length"

    llm.engine.eos_ids = frozenset({stop_tok})   # pretend the model's EOS is that token
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0]
    assert out.outputs[0].token_ids == ref[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", None)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    assert llm.engine.blocks.all_free()


def test_max_model_len_caps_output(prompts16):
    llm = make_llm()
    prompt = prompts16[13]  # 60 tokens; max_model_len 128 leaves 68
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == ENGINE_KW["max_model_len"] - len(prompt)
    assert out.outputs[0].finish_reason == "length"


def test_stop_strings_and_text(tokenizer):
    llm = make_llm(tokenizer=tokenizer)
    base = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=40,
                                                                     ignore_eos=True))[0]
    text = base.outputs[0].text
    assert base.prompt == "The capital of France is"
    assert base.prompt_token_ids == tokenizer.encode("The capital of France is", add_special_tokens=True)
    assert text == tokenizer.decode(base.outputs[0].token_ids)
    at = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[at:at + 2]
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=40,
                                                                    ignore_eos=True, stop=[stop, "\x00never"]))[0]
    assert out.outputs[0].text == text[: text.find(stop)]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
    assert out.outputs[0].token_ids == base.outputs[0].token_ids[: len(out.outputs[0].token_ids)]


def test_stream_and_chat(tokenizer):
    llm = make_llm(tokenizer=tokenizer)
    sp = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    prompts = ["héllo wörld ✓", "a"]
    final = llm.generate(prompts, sp)
    deltas: dict[str, list] = {}
    finished = []
    for upd in llm.stream(prompts, sp):
        deltas.setdefault(upd.prompt, []).append(upd.outputs[0])
        if upd.finished:
            finished.append(upd.prompt)
    assert sorted(finished) == sorted(prompts)
    for p, f in zip(prompts, final):
        parts = deltas[p]
        assert "".join(c.delta_text for c in parts) == f.outputs[0].text
        assert [t for c in parts for t in c.delta_token_ids] == f.outputs[0].token_ids

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = llm.chat(messages, sp)[0]
    templated = tokenizer.apply_chat_template(messages)
    assert chat.prompt_token_ids == tokenizer.encode(templated)
    assert chat.prompt_token_ids[0] == 256   # <|im_start|> is one special token
    assert len(chat.outputs[0].token_ids) == 15


@pytest.mark.parametrize("interval", [2, 3])
def test_stream_interval_batches_updates_and_loses_nothing(tokenizer, interval):
    """A streamed request reports its first token, then every `interval` tokens, then its
    end; the deltas still add up to the final text and tokens, and one request's interval
    does not change another's."""
    llm = make_llm(tokenizer=tokenizer)
    sp = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)
    prompts = ["héllo wörld ✓", "a b c"]
    final = {p: o.outputs[0] for p, o in zip(prompts, llm.generate(prompts, sp))}
    eng = llm.engine
    with pytest.raises(RequestError, match="stream_interval"):
        eng.add_request(prompts[0], sp, stream_interval=0)
    eng.add_request(prompts[0], sp, request_id="spaced", stream_interval=interval)
    eng.add_request(prompts[1], sp, request_id="every")
    updates: dict[str, list] = {"spaced": [], "every": []}
    while eng.has_unfinished():
        for out in eng.step():
            updates[out.request_id].append(out.outputs[0])
    for rid, prompt in (("spaced", prompts[0]), ("every", prompts[1])):
        parts = updates[rid]
        assert "".join(c.delta_text for c in parts) == final[prompt].text
        assert [t for c in parts for t in c.delta_token_ids] == final[prompt].token_ids
    counts = [len(c.token_ids) for c in updates["spaced"]]
    assert counts == [n for n in range(1, 11) if (n - 1) % interval == 0] + [11]
    assert [len(c.token_ids) for c in updates["every"]] == list(range(1, 12))


def test_seeded_sampling_is_batch_independent(prompts16):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = make_llm(async_scheduling=False).generate([prompts16[4]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True)] * 6
    crowd = make_llm(async_scheduling=True, seed=99).generate(prompts16[:7], others[:4] + [seeded] + others[4:])
    assert crowd[4].outputs[0].token_ids == alone
    other_seed = make_llm().generate([prompts16[4]], SamplingParams(temperature=1.0, top_p=0.95, seed=4321,
                                                                    max_tokens=10, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_bad_requests_fail_alone(prompts16):
    llm = make_llm()
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    batch = [prompts16[2], [], list(range(150)), [5, 999], prompts16[3], "text without tokenizer", prompts16[5]]
    params = [good, good, good, good, {"temperature": -1.0}, good, good]
    outs = llm.generate(batch, params)
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[6] is None
    assert "empty" in errors[1]
    assert "max_model_len" in errors[2] and "150" in errors[2]
    assert "outside the vocabulary" in errors[3]
    assert "temperature" in errors[4]
    assert "tokenizer" in errors[5]
    ref = reference_greedy([prompts16[2], prompts16[5]], 6)
    assert outs[0].outputs[0].token_ids == ref[0] and outs[6].outputs[0].token_ids == ref[1]
    assert all(o.outputs[0].finish_reason == "error" for o in outs[1:6])
    assert llm.engine.blocks.all_free()


def test_request_needing_more_pages_than_exist():
    # A separate small engine: 8 usable pages of 4 tokens hold 32 tokens, less than max_model_len.
    llm = make_llm(max_model_len=64, num_kv_pages=9, max_num_batched_tokens=16, max_num_seqs=4)
    outs = llm.generate([[1] * 20, [2] * 10], [SamplingParams(max_tokens=30), SamplingParams(max_tokens=5)])
    assert "KV pages" in outs[0].error and "num_kv_pages" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 5


def test_engine_api_abort_and_duplicate_ids(prompts16):
    from nanoflow_jax.engine import RequestError

    llm = make_llm()
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for i in range(3):
        eng.add_request(prompts16[i + 8], sp, request_id=f"r{i}")
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request([1, 2], sp, request_id="r0")
    finished = {}
    for _ in range(3):
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    aborted = eng.abort("r1")
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    assert eng.abort("r1") is None
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id != "r1", "an aborted request produced output"
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r2"]
    ref = reference_greedy([prompts16[8], prompts16[10]], 10)
    assert finished["r0"].outputs[0].token_ids == ref[0] and finished["r2"].outputs[0].token_ids == ref[1]
    assert eng.blocks.all_free()


def test_llm_from_in_memory_params_needs_config():
    with pytest.raises(ValueError, match="config"):
        LLM(params=tiny_params())
    llm = LLM(params=tiny_params(), config=TINY, **ENGINE_KW)
    assert llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0] \
        .outputs[0].token_ids == reference_greedy([[3, 4, 5]], 2)[0]


def test_kv_pool_sizing_without_an_explicit_page_count():
    if jax.local_devices()[0].memory_stats() is None:   # CPU: no statistics to size from
        with pytest.raises(ValueError, match="num_kv_pages"):
            make_llm(num_kv_pages=None, kv_memory_fraction=0.5)
        llm = make_llm(num_kv_pages=None, max_model_len=64)   # a derived default, with a warning
        assert llm.engine.runner.num_pages == 1 + ENGINE_KW["max_num_seqs"] * 16
    else:
        llm = make_llm(num_kv_pages=None, kv_memory_fraction=0.05)
        assert llm.engine.runner.num_pages > 2
    assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0] \
        .outputs[0].token_ids == reference_greedy([[1, 2, 3]], 3)[0]
    assert IM_END == TINY.eos_token_id


def test_fused_qkv_engine_matches_dense_reference(prompts16, reference16):
    """EngineConfig.fuse_qkv (one QKV GEMM) serves the same greedy tokens."""
    out = make_llm(fuse_qkv=True).generate(prompts16[:6], GREEDY)
    assert [o.outputs[0].token_ids for o in out] == reference16[:6]


def test_pallas_engine_runs_decode_only_steps(prompts16, reference16):
    """With Pallas kernels (interpreted here; K's RoPE fused into the cache write) pure-decode
    batches take their own compiled step, which skips the prefill attention kernel, and
    the greedy tokens still match."""
    llm = make_llm(kernels="pallas", max_num_batched_tokens=64, fuse_rope_kv=True, decode_only_steps=True)
    assert llm.engine.runner.ops.fuse_rope_kv
    runner = llm.engine.runner
    assert runner.decode_only_steps
    used: list[bool] = []
    dispatch = runner.dispatch

    def spy(batch, prev, send=None):
        used.append(batch.num_decode == len(batch.rows))
        return dispatch(batch, prev, send)

    runner.dispatch = spy
    out = llm.generate(prompts16[:3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == [r[:4] for r in reference16[:3]]
    assert any(used) and not all(used)  # both kinds of step ran
    assert any(dec for _, _, dec in runner._compiled) and not all(dec for _, _, dec in runner._compiled)
    # one XLA attention path: no extra compile
    assert not make_llm(kernels="xla", decode_only_steps=True).engine.runner.decode_only_steps
