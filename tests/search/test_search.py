"""The two-stage search: the simulation by hand, the optimum against brute force on the same
space, no overlap where sharing gains nothing, batch sizing by hand, the engine's format."""

from __future__ import annotations

import math

import pytest

from nanoflow_jax import autosearch
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.search import search as S
from nanoflow_jax.search.interference import DEFAULT, Interference, Point
from nanoflow_jax.search.profile import OpTable, Profile
from tests.search.synthetic import synthetic_profile

LLAMA = ModelConfig.from_name("llama-3-8b")


def test_nano_ops_count_every_token_and_key():
    w = S.Workload(tokens=40, decodes=7, context=30, rows=8)
    for start, stop in ((0, 8), (8, 40), (0, 40), (3, 21), (20, 40)):
        work = dict(w.nano_ops(start, stop))
        decodes = sum(1 for i in range(start, stop) if i < w.decodes)
        keys = sum(w.context + (i - w.decodes) + 1 for i in range(start, stop) if i >= w.decodes)
        assert work.get("decode_attention", 0) == decodes * (w.context + 1)
        assert work.get("prefill_attention", 0) == keys
        assert work["qkv"] == work["norm_rope"] == stop - start
    assert [op for op, _ in w.nano_ops(0, 7)] == ["decode_attention", "o", "gate_up", "down", "norm_rope", "qkv"]
    with pytest.raises(ValueError, match="decodes < rows < tokens"):
        S.Workload(tokens=8, decodes=8, context=1, rows=8)


def flat_profile(times: dict[str, float], sms: int = 100) -> Profile:
    """Every op takes times[op] ms on the whole GPU, (sms / programs) x that on fewer."""
    ops = {}
    for op in ("qkv", "o", "gate_up", "down", "lm_head", "prefill_attention", "decode_attention", "norm_rope",
               "sampler"):
        t = times.get(op, 1.0)
        ops[op] = OpTable((1.0,), (50, sms), ((2 * t, t),))
    return Profile(device="test", num_sms=sms, shape="s", dtype="bfloat16", ops=ops, source="synthetic")


def test_layer_simulation_by_hand():
    prof = flat_profile({"gate_up": 2.0, "decode_attention": 1.0})
    inter = Interference(points={("compute", "memory"): (Point(0.5, 1.5),)})
    model = S.CostModel(prof, inter, num_layers=1, gap_graphs_ms=0.0, gap_streams_ms=0.0)
    # One chain: the ops one after another.
    assert model.layer_ms([[("gate_up", 1.0), ("decode_attention", 1.0)]], ((100, 100),)) == pytest.approx(3.0)
    # Side by side on 50 programs each: 4 ms and 2 ms alone, x1.5 together: attention ends at 3 ms
    # with 3/6 of the GEMM done; the rest alone takes 2 ms: 5 ms.
    chains = [[("gate_up", 1.0)], [("decode_attention", 1.0)]]
    assert model.layer_ms(chains, ((50, 50), (50, 50))) == pytest.approx(5.0)
    # Both asking for the whole GPU get half each until attention ends at 3 ms; then the GEMM's
    # waiting programs take every SM: its last half takes 1 ms.
    assert model.layer_ms(chains, ((100, 100), (100, 100))) == pytest.approx(4.0)
    trace: list = []
    model.layer_ms(chains, ((50, 50), (50, 50)), trace)
    assert trace == [{"stream": 2, "op": "decode_attention", "work": 1.0, "start_ms": 0.0, "end_ms": 3.0},
                     {"stream": 1, "op": "gate_up", "work": 1.0, "start_ms": 0.0, "end_ms": 5.0}]
    # A launch gap delays its stream without slowing the other.
    gapped = [[("gap", 1.0), ("gate_up", 1.0)], [("decode_attention", 1.0)]]
    # 0-1: attention alone (100 programs wanted -> 1 ms/ms: done at 1); then the GEMM alone, 2 ms.
    assert model.layer_ms(gapped, ((100, 100), (100, 100))) == pytest.approx(3.0)


def brute_force(model: S.CostModel, w: S.Workload, space: list[S.Structure]) -> S.Candidate:
    return min((model.evaluate(s, w, shares) for s in space for shares in model.share_space(s)),
               key=lambda c: c.iteration_ms)


@pytest.mark.parametrize("saturation, interference", [
    (0.5, DEFAULT),
    (0.34, Interference(points={("compute", "memory"): (Point(0.3, 1.05), Point(0.6, 1.6))}, unmeasured=1.2)),
])
def test_two_stage_finds_the_brute_force_optimum(saturation, interference):
    prof = synthetic_profile(LLAMA, memory_saturation=saturation)
    model = S.CostModel(prof, interference, num_layers=4, share_fractions=(1 / 3, 2 / 3, 1.0))
    w = S.Workload(tokens=512, decodes=127, context=1024, rows=128)
    space = S.structures(w, max_nano=3, cut_step=128)
    assert {len(s.streams) for s in space} == {1, 2, 3} and any(s.rotation for s in space)
    best, searched = S.two_stage(model, w, space)
    ref = brute_force(model, w, space)
    assert best.iteration_ms == pytest.approx(ref.iteration_ms, rel=1e-12)
    assert searched < len(space)   # the bounds pruned something
    for s in space:                # and every bound is a bound
        assert model.lower_bound(s, w) <= min(model.evaluate(s, w, sh).iteration_ms
                                              for sh in model.share_space(s)) + 1e-9


def test_no_sharing_gain_picks_sequential():
    # Memory bandwidth linear in programs (no op runs as fast on part of the GPU) and no
    # interference: overlapping can only tie, and splitting reads the weights twice.
    prof = synthetic_profile(LLAMA, memory_saturation=1.0)
    model = S.CostModel(prof, Interference(points={}), num_layers=LLAMA.num_layers,
                        share_fractions=(1 / 3, 2 / 3, 1.0))
    w = S.Workload(tokens=512, decodes=127, context=1024, rows=128)
    out = S.search(model, w, max_nano=2, cut_step=128)
    assert out["best"] == {"pipeline": "sequential", "predicted_ms": out["predicted"]["sequential"],
                           "nano_programs": [{}, {}]}
    assert len(out["optimum"]["nano_batches"]) == 1
    assert out["predicted"]["sequential"] < min(out["predicted"]["nanobatch"], out["predicted"]["nanoflow"])


def test_sharing_gain_picks_nanoflow_with_engine_budgets():
    prof = synthetic_profile(LLAMA, memory_saturation=0.25)
    model = S.CostModel(prof, DEFAULT, num_layers=LLAMA.num_layers)
    w = S.Workload(tokens=1536, decodes=511, context=1280, rows=512)
    out = S.search(model, w, max_nano=1, top=2)
    assert out["best"]["pipeline"] == "nanoflow"
    assert out["predicted"]["nanoflow"] < out["predicted"]["sequential"]
    assert len(out["candidates"]) == 2
    first = out["candidates"][0]
    assert first["predicted_ms"] == out["predicted"]["nanoflow"] == out["best"]["predicted_ms"]
    # The engine's format: two budget dicts that autosearch and EngineConfig accept.
    a, b = autosearch.parse_programs(S.programs_spec(first["nano_programs"]))
    assert [a, b] == first["nano_programs"] == out["best"]["nano_programs"]
    assert S.predict(model, w, "nanoflow", first["nano_programs"]) == pytest.approx(first["predicted_ms"], abs=1e-3)


def test_nano_programs_leave_whole_gpu_shares_unbudgeted():
    assert S.nano_programs(((132, 44), (88, 132)), 132) == [
        {"decode_attention": 44, "norm": 44, "rope": 44},
        {"gemm": 88, "prefill_attention": 88}]
    assert S.programs_spec([{"gemm": 88, "rope": 3}, {}]) == "gemm=88,rope=3|"


def test_batch_sizing_by_hand():
    # Llama-3-8B: 32 layers, 8 KV heads of 128 in bf16 -> 2 x 32 x 8 x 128 x 2 bytes a token.
    kv_token = 131072
    params = (2 * 128256 * 4096                                     # embeddings and LM head
              + 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 4096)
    memory = 143771 * 2**20                                          # an H200
    pages = int(0.8 * (memory - 2 * params)) // (16 * kv_token)
    assert pages // 96 == 535                                        # 1,536-token requests: 96 pages
    sizing = S.size_batch(LLAMA, 2, memory, 1024, 512)
    assert (sizing.kv_bytes_per_token, sizing.weight_bytes, sizing.kv_pages) == (kv_token, 2 * params, pages)
    assert sizing.max_num_seqs == 512                                # the issue's ~512 requests
    # Steady state: 512 / 512 requests finish each iteration, their 1,024 prompt tokens prefill.
    assert sizing.max_num_batched_tokens == 512 + 1024 == 1536
    assert sizing.workload(1024, 512) == S.Workload(tokens=1536, decodes=511, context=1280, rows=512)
    long_out = S.size_batch(LLAMA, 2, memory, 512, 1024)
    assert long_out.max_num_seqs == 512 and long_out.max_num_batched_tokens == math.ceil(512 * 1.5 / 128) * 128
    with pytest.raises(ValueError, match="fewer than 64"):
        S.size_batch(LLAMA, 2, 20 * 2**30, 1024, 512)
    # An fp8 cache: a byte a value, so twice the pages and (on an H100) twice the requests.
    h100 = 81559 * 2**20
    bf16, fp8 = S.size_batch(LLAMA, 2, h100, 1024, 512), S.size_batch(LLAMA, 2, h100, 1024, 512, kv_dtype_bytes=1)
    assert fp8.kv_bytes_per_token * 2 == kv_token and fp8.kv_pages in (2 * bf16.kv_pages, 2 * bf16.kv_pages + 1)
    assert (bf16.max_num_seqs, fp8.max_num_seqs) == (256, 512)
