"""bench.iteration: a traced window cut into iterations and operations, the floors, and
bench.throughput's --profile-steps on CPU (windows traced and recorded; no kernel records)."""

import gzip
import json
import random

import pytest

from bench import iteration, throughput
from nanoflow_jax.config import ModelConfig

CFG = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=64, intermediate_size=160, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def synthetic_iteration(rng: random.Random, layers: int, mixed: bool) -> list[tuple[str, str, float]]:
    """(kernel name, the op it belongs to, duration us) in the order the engine's step runs them;
    GEMMs carry names no marker knows, as a library kernel would."""
    out = [("input_gather_fusion", "embedding", rng.uniform(2, 4))]
    for layer in range(layers):
        out += [("rms_norm", "attn_norm", rng.uniform(3, 5)), ("sm90_kernel_a", "qkv_gemm", rng.uniform(40, 60)),
                ("split_fusion", "qkv_gemm", rng.uniform(1, 2)),
                ("rope", "rope", rng.uniform(3, 5)), ("rope", "rope", rng.uniform(2, 3)),
                ("write_kv", "write_kv", rng.uniform(2, 4)),
                ("paged_decode_attention", "decode_attention", rng.uniform(30, 50))]
        if mixed:
            out += [("paged_prefill_attention", "prefill_attention", rng.uniform(20, 30))]
        out += [("combine_fusion", "attention_glue", rng.uniform(1, 3)), ("sm90_kernel_b", "o_gemm", rng.uniform(25, 35)),
                ("reduce_fusion", "o_gemm", rng.uniform(1, 2)),
                ("rms_norm", "mlp_norm", rng.uniform(3, 5)), ("sm90_kernel_c", "gate_up_gemm", rng.uniform(90, 110)),
                ("sm90_kernel_d", "down_gemm", rng.uniform(50, 70)), ("slice_fusion", "down_gemm", rng.uniform(1, 2))]
    out[-1] = (out[-1][0], "lm_head", out[-1][2])   # after the last down GEMM: the LM head's inputs
    out += [("final_norm_fusion", "lm_head", rng.uniform(1, 2)), ("cutlass_lm_head", "lm_head", rng.uniform(80, 95)),
            ("argmax_fusion", "sampler", rng.uniform(5, 75)), ("scatter_fusion", "sampler", rng.uniform(1, 2))]
    return out


def lay_out(iterations, rng):
    """Kernel records with small gaps inside an iteration and larger ones between."""
    kernels, t = [], 1000.0
    for it in iterations:
        for name, _, dur in it:
            kernels.append((name, 7, t, dur))
            t += dur + rng.uniform(0.0, 1.5)
        t += rng.uniform(8, 40)
    return kernels


def test_iterations_and_operations_are_recovered_from_kernel_order():
    rng = random.Random()
    kinds = [rng.random() < 0.5 for _ in range(5)]
    truth = [synthetic_iteration(rng, CFG.num_layers, m) for m in kinds]
    kernels = lay_out(truth, rng)
    its = iteration.split_iterations(kernels, CFG.num_layers)
    assert [len(i) for i in its] == [len(t) for t in truth]
    for it, t in zip(its, truth):
        ops = iteration.attribute(it, CFG.num_layers)
        expect = {}
        for _, op, dur in t:
            expect[op] = expect.get(op, 0.0) + dur
        assert set(ops) == set(expect)
        for op, us in expect.items():
            assert ops[op]["us"] == pytest.approx(us, abs=0.01), op
        assert sum(r["kernels"] for r in ops.values()) == len(t)


def test_a_window_not_traced_whole_is_refused():
    rng = random.Random(0)
    kernels = lay_out([synthetic_iteration(rng, CFG.num_layers, True)], rng)
    with pytest.raises(ValueError, match="not a multiple of 6"):
        iteration.split_iterations(kernels[5:], CFG.num_layers)


def test_busy_time_is_the_union_of_intervals():
    ks = [("a", 0, 0.0, 10.0), ("b", 1, 5.0, 10.0), ("c", 0, 20.0, 5.0), ("d", 0, 21.0, 1.0)]
    assert iteration.busy_us(ks) == pytest.approx(20.0)


def test_floors_count_every_weight_once_and_every_token_through_it():
    n, decodes, ctx = 300, 40, 513
    step = {"tokens": n, "rows": 41, "decodes": decodes, "decode_context": decodes * ctx, "prefill": [[100, 260]]}
    ceil = iteration.Ceilings(gemm_tflops=500.0, copy_gbs=3000.0)
    f = iteration.op_floors(CFG, step, ceil)
    e, i_, L = CFG.hidden_size, CFG.intermediate_size, CFG.num_layers
    layer_params = e * (CFG.q_size + 2 * CFG.kv_size) + CFG.q_size * e + 3 * e * i_
    gemm_flops = sum(f[op]["flops"] for op in ("qkv_gemm", "o_gemm", "gate_up_gemm", "down_gemm"))
    assert gemm_flops == 2 * n * L * layer_params
    assert f["lm_head"]["flops"] == 2 * 41 * e * CFG.vocab_size
    # Prefill attention: query i of the chunk (position 100 + i) attends 101 + i keys.
    keys = sum(100 + i + 1 for i in range(260))
    assert f["prefill_attention"]["flops"] == L * 4 * keys * CFG.num_heads * CFG.head_dim
    assert f["decode_attention"]["bytes"] >= L * decodes * ctx * 2 * CFG.kv_size * 2
    for op, row in f.items():
        compute, memory = row["flops"] / 500e6, row["bytes"] / 3000e3
        assert row["floor_us"] == pytest.approx(max(compute, memory), abs=0.01)
        assert row["bound"] == ("compute" if compute >= memory else "memory")


def test_an_fp8_cache_halves_the_attention_floors_cache_bytes():
    step = {"tokens": 300, "rows": 41, "decodes": 40, "decode_context": 40 * 513, "prefill": [[100, 260]]}
    ceil = iteration.Ceilings(gemm_tflops=500.0, copy_gbs=3000.0)
    bf16, fp8 = iteration.op_floors(CFG, step, ceil), iteration.op_floors(CFG, {**step, "kv_elem": 1}, ceil)
    L, kv = CFG.num_layers, CFG.kv_size
    assert bf16["decode_attention"]["bytes"] - fp8["decode_attention"]["bytes"] == L * 40 * 513 * 2 * kv
    assert bf16["prefill_attention"]["bytes"] - fp8["prefill_attention"]["bytes"] == L * 360 * 2 * kv
    assert bf16["write_kv"]["bytes"] - fp8["write_kv"]["bytes"] == L * 300 * 2 * kv
    assert all(bf16[op] == fp8[op] for op in bf16 if op not in ("decode_attention", "prefill_attention", "write_kv"))


def synthetic_window(kinds, cfg=CFG):
    """A perfetto trace of iterations of these kinds (True: mixed), and their step records."""
    rng = random.Random()
    kernels = lay_out([synthetic_iteration(rng, cfg.num_layers, m) for m in kinds], rng)
    trace = {"traceEvents": [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
                             {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}}]
             + [{"ph": "X", "pid": 1, "tid": 7, "name": k[0], "ts": k[2], "dur": k[3]} for k in kernels]}
    steps = [{"tokens": 290 if m else 32, "rows": 33, "decodes": 32, "decode_context": 32 * 400,
              "prefill": [[0, 258]] if m else [], "bucket_tokens": 512 if m else 32, "bucket_width": 32,
              "decode_only": not m} for m in kinds]
    return trace, steps, kernels


def test_analyze_reports_the_window_and_a_representative_of_each_kind():
    kinds = [True, False, True, False, False]
    trace, steps, kernels = synthetic_window(kinds)
    r = iteration.analyze(trace, steps, CFG, iteration.Ceilings(500.0, 3000.0))
    assert r["measured"] and r["window"]["iterations"] == 5
    gaps = sum(kernels[i + 1][2] - kernels[i][2] - kernels[i][3] for i in range(len(kernels) - 1))
    span = kernels[-1][2] + kernels[-1][3] - kernels[0][2]
    w = r["window"]
    shares = w["idle_between_iterations_share"] + w["gaps_inside_iterations_share"]
    assert shares * span == pytest.approx(gaps, abs=2e-4 * span)   # shares are rounded to 1e-4
    assert r["representative"]["mixed"]["step"]["prefill"] and not r["representative"]["decode"]["step"]["prefill"]
    table = r["representative"]["decode"]["table"]
    assert "prefill_attention" not in {t["op"] for t in table}
    assert [t["waste_us"] for t in table] == sorted((t["waste_us"] for t in table), reverse=True)
    with pytest.raises(ValueError, match="5 iterations traced against 4"):
        iteration.analyze(trace, steps[:4], CFG, iteration.Ceilings(500.0, 3000.0))
    merged = iteration.merge_windows([r, {"measured": False, "note": "x"}])
    assert merged["idle_between_iterations_share"] == w["idle_between_iterations_share"]


@pytest.mark.parametrize("spec, error", [("3", "START:COUNT"), ("4:1", "COUNT >= 2"), ("1:5,3:2", "overlap")])
def test_profile_windows_are_checked(spec, error):
    with pytest.raises(ValueError, match=error):
        iteration.parse_windows(spec)
    assert iteration.parse_windows("9:2,1:3") == [(1, 3), (9, 2)]


def test_throughput_traces_its_windows_and_records_each_dispatched_batch(tmp_path):
    out = tmp_path / "r.json"
    args = [*TINY, "--num-prompts", "3", "--input-len", "40", "--output-len", "6",
            "--precompile", "1", "--profile-steps", "1:3", "--output-json", str(out)]
    assert throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert r["profiled_windows"] == [{"start": 1, "count": 3}]
    assert r["iteration_profile"]["measured"] is False   # CPU: no kernel records
    steps = r["iteration_profile"]["windows"][0]["steps"]
    # Async scheduling: each step dispatches one batch; 40-token prompts over a 32-token budget
    # give mixed batches first.
    assert len(steps) == 3 and all(s["tokens"] <= 32 and s["bucket_tokens"] >= s["tokens"] for s in steps)
    assert any(s["prefill"] for s in steps)
    assert r["failed_requests"] == 0 and r["generated_tokens"] == 18


TINY = ["--model", "smollm2-135m", "--weights", "random", "--dtype", "float32", "--max-num-batched-tokens", "32",
        "--max-num-seqs", "4", "--num-kv-pages", "40", "--gemm-peak-tflops", "2.0"]


def test_the_offline_cli_analyses_a_saved_window_again(tmp_path):
    cfg = ModelConfig.from_name("smollm2-135m")
    trace, steps, _ = synthetic_window([False, True, False], cfg)
    with gzip.open(tmp_path / "w.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    result = {"model": "smollm2-135m", "iteration_profile": {
        "ceilings": {"gemm_tflops": 600.0, "copy_gbs": 4000.0},
        "windows": [{"start": 40, "count": 3, "steps": steps, "trace": "elsewhere"}]}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    base = ["--result", str(tmp_path / "r.json"), "--trace", str(tmp_path / "w.trace.json.gz")]
    assert iteration.main([*base, "--window", "40", "--out", str(tmp_path / "o.json"),
                           "--plot", str(tmp_path / "o.png")]) == 0
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["window"]["iterations"] == 3 and set(report["representative"]) == {"mixed", "decode"}
    assert (tmp_path / "o.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        iteration.main([*base, "--window", "41"])


def test_the_run_floor_sums_its_iterations_and_overlap_never_costs_more():
    ceil = iteration.Ceilings(gemm_tflops=400.0, copy_gbs=2000.0)
    rng = random.Random()
    steps = [{"tokens": n, "rows": min(n, 32), "decodes": min(n, 32), "decode_context": 32 * rng.randint(10, 900),
              "prefill": [[0, n - 32]] if n > 32 else []} for n in (rng.choice([32, 96, 512]) for _ in range(6))]
    total = iteration.run_floor(CFG, steps, ceil)
    parts = [iteration.run_floor(CFG, [s], ceil) for s in steps]
    assert total["iterations"] == 6
    assert total["sequential_s"] == pytest.approx(sum(p["sequential_s"] for p in parts), abs=1e-5)
    assert total["overlapped_s"] == pytest.approx(sum(p["overlapped_s"] for p in parts), abs=1e-5)
    for s, p in zip(steps, parts):
        f = iteration.op_floors(CFG, s, ceil)
        assert p["sequential_s"] == pytest.approx(sum(r["floor_us"] for r in f.values()) / 1e6, abs=1e-6)
        assert max(r["floor_us"] for r in f.values()) / 1e6 - 1e-6 <= p["overlapped_s"] <= p["sequential_s"] + 1e-6
