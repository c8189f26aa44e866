"""`python -m bench.throughput` on CPU with a small shipped config: fields, arithmetic, JSON file,
the dataset workloads, `--pipeline all` and the PNG; `bench.datasets`' length statistics."""

import json

import numpy as np
import pytest

from bench import datasets, throughput

TINY = ["--model", "smollm2-135m", "--weights", "random", "--dtype", "float32", "--max-num-batched-tokens", "32",
        "--max-num-seqs", "4", "--num-kv-pages", "16", "--gemm-peak-tflops", "2.0"]
QUANTILE_MEDIAN = datasets.QUANTILE_LEVELS.index(0.5)


def test_throughput_cli_writes_a_consistent_result(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = throughput.main([*TINY, "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                            "--precompile", "1", "--output-json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["generated_tokens"] == 3 * 4 and r["total_tokens"] == 3 * (8 + 4) and r["failed_requests"] == 0
    assert r["device"] and r["jax"] and r["command"].startswith("python -m bench.throughput")
    assert r["pipeline"] == "sequential" and r["workload"]["dataset"] == "random"
    optimal = 2.0e12 / (2 * r["params"])
    assert abs(r["optimal_tokens_per_s"] - optimal) < 1e-6 * optimal
    assert abs(r["fraction_of_optimal"] - r["total_tokens_per_s"] / optimal) < 1e-9
    assert r["requests_per_s"] == pytest.approx(3 / r["elapsed_s"])
    assert r["output_tokens_per_s"] == pytest.approx(12 / r["elapsed_s"])
    assert r["total_tokens_per_s_per_device"] == r["total_tokens_per_s"] and r["devices"] == 1
    # Every engine step is timed; their sum cannot exceed the generate call's wall time.
    assert r["steps"] == len(r["step_ms"]) >= r["iterations"] > 0
    assert 0 < r["host_ms_per_step"]["median"] <= r["host_ms_per_step"]["p90"] <= r["host_ms_per_step"]["max"]
    assert sum(r["step_ms"]) <= 1e3 * r["elapsed_s"] + 1e-3 * len(r["step_ms"])
    assert r["device_idle"]["measured"] is False and r["device_idle"]["share"] is None
    # Precompiled: every bucket compiles inside start-up, none in the timed run.
    assert r["precompiled"] and list(r["compile_s"]) == ["startup"] and r["compiled_buckets"]["startup"] >= 1
    assert r["startup_s"] > r["compile_s"]["startup"] > 0 and r["warmup_s"] > 0
    kv = r["kv_pool"]
    assert kv["pages"] == 16 and kv["usable_pages"] == 15 and 0 < kv["peak_pages_used"] <= 15 and kv["bytes"] > 0
    assert r["memory"]["reported"] is False   # the CPU backend has no memory statistics
    assert json.loads(capsys.readouterr().out) == r


def test_throughput_cli_dataset_lengths_per_request(tmp_path):
    out = tmp_path / "r.json"
    throughput.main([*TINY, "--dataset-name", "lmsys", "--num-prompts", "5", "--max-model-len", "40",
                     "--seed", "3", "--out", str(out)])
    r = json.loads(out.read_text())
    w = r["workload"]
    assert w["dataset"] == "lmsys-chat-1m" and w["max_model_len"] == 40
    ins, outs = datasets.request_lengths("lmsys-chat-1m", 5, 3)
    ins, outs, capped = datasets.cap_lengths(ins, outs, 40)
    assert w["requests_capped"] == capped and w["input_len"]["mean"] == pytest.approx(ins.mean())
    # ignore_eos: every request generates exactly its own (capped) output length.
    assert r["generated_tokens"] == outs.sum() and r["prompt_tokens"] == ins.sum()
    assert int((ins + outs).max()) <= 40


def test_throughput_cli_all_pipelines_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    throughput.main([*TINY, "--pipeline", "all", "--num-prompts", "4", "--input-len", "12", "--output-len", "3",
                     "--out", str(out), "--plot", str(png)])
    r = json.loads(out.read_text())
    assert list(r["modes"]) == ["sequential", "nanobatch", "nanoflow"]
    for mode, m in r["modes"].items():
        assert m["pipeline"] == mode == m["engine"]["pipeline"]
        assert m["generated_tokens"] == 4 * 3 and m["failed_requests"] == 0 and "fraction_of_optimal" in m
    base = r["modes"]["sequential"]["total_tokens_per_s"]
    assert r["speedup_over_sequential"] == pytest.approx(
        {m: r["modes"][m]["total_tokens_per_s"] / base for m in ("nanobatch", "nanoflow")})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
def test_dataset_means_match_the_stated_ones(name):
    ins, outs = datasets.request_lengths(name, 20000, seed=0)
    want_in, want_out = datasets.GENERATED_MEANS[name]
    assert ins.mean() == pytest.approx(want_in, rel=0.03) and outs.mean() == pytest.approx(want_out, rel=0.03)
    d = datasets.DATASETS[name]
    assert ins.min() >= d.input_quantiles[0] and ins.max() <= d.input_quantiles[-1]
    assert np.median(outs) == pytest.approx(d.output_quantiles[QUANTILE_MEDIAN], abs=1)
    same = datasets.request_lengths(name, 100, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(same, datasets.request_lengths(name, 100, seed=7)))
    assert not np.array_equal(same[0], datasets.request_lengths(name, 100, seed=8)[0])


def test_dataset_names_aliases_and_errors(capsys):
    assert datasets.resolve("Splitwise") == "splitwise-conv" and datasets.resolve("lmsys") == "lmsys-chat-1m"
    with pytest.raises(SystemExit):
        throughput.parse_args(["--dataset", "alpaca"])
    err = capsys.readouterr().err
    assert "unknown dataset 'alpaca'" in err and "sharegpt" in err and "splitwise-code" in err
    with pytest.raises(ValueError, match="--input-len and --output-len"):
        datasets.request_lengths("random", 2, 0, input_len=0, output_len=4)


def test_dataset_path_samples_a_csv_trace(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nx,10,3\nx,20,5\nx,0,4\n")
    ins, outs = datasets.request_lengths("random", 50, 1, path=trace)
    assert set(zip(ins.tolist(), outs.tolist())) == {(10, 3), (20, 5)}   # the empty prompt is dropped
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="ContextTokens,GeneratedTokens or input_len,output_len"):
        datasets.read_trace(bad)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--dataset-path", str(tmp_path / "missing.csv")])


def test_cap_lengths_keeps_one_output_token():
    ins, outs, n = datasets.cap_lengths(np.array([5, 30, 8]), np.array([10, 10, 2]), 16)
    assert ins.tolist() == [5, 15, 8] and outs.tolist() == [10, 1, 2] and n == 1


def test_spec_peak_by_device_name():
    assert throughput.spec_peak_tflops("NVIDIA H200") == 989.4
    assert throughput.spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert throughput.spec_peak_tflops("cpu") is None


def test_device_memory_reports_the_backend_statistics(monkeypatch):
    import jax

    class Device:
        def memory_stats(self):
            return {"bytes_in_use": 5, "peak_bytes_in_use": 9, "bytes_limit": 100, "num_allocs": 3}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    m = throughput.device_memory()
    assert m["reported"] and (m["bytes_in_use"], m["peak_bytes_in_use"], m["bytes_limit"]) == (5, 9, 100)
    assert "num_allocs" not in m


def test_a_request_larger_than_the_kv_pool_stops_the_run_before_timing():
    from nanoflow_jax.engine.block_manager import BlockManager

    args = throughput.parse_args([*TINY, "--block-size", "16"])
    fits = {"ins": np.array([20, 100]), "outs": np.array([10, 140])}
    throughput.check_pool_fits(BlockManager(16, 16), fits, args)   # 240 tokens: 15 pages, all usable
    with pytest.raises(SystemExit, match="1 of 2 requests need more KV pages than the pool's 14.*--num-kv-pages 16"):
        throughput.check_pool_fits(BlockManager(15, 16), fits, args)


def test_a_failing_warm_up_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """A step that fails on the device (here: out of memory) fails the warm-up's requests;
    the benchmark stops with that error rather than timing a run of failed requests."""
    from nanoflow_jax.engine.model_runner import ModelRunner

    def out_of_memory(self, batch, prev_tokens, send=None):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.39GiB")

    monkeypatch.setattr(ModelRunner, "dispatch", out_of_memory)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="warm-up failed .*RESOURCE_EXHAUSTED"):
        throughput.main([*TINY, "--num-prompts", "2", "--input-len", "8", "--output-len", "4",
                         "--output-json", str(out)])
    assert not out.exists()


def test_the_engine_is_freed_before_the_ceilings_are_measured(monkeypatch):
    """The GEMM peak and copy bandwidth are measured after the run: the engine's KV pool and
    weights must be gone by then, or on a full GPU those measurements run out of memory."""
    import gc
    import weakref

    from nanoflow_jax.engine.model_runner import ModelRunner

    runners = []
    init = ModelRunner.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        runners.append(weakref.ref(self))

    monkeypatch.setattr(ModelRunner, "__init__", tracked)
    args = throughput.parse_args([*TINY, "--num-prompts", "2", "--input-len", "8", "--output-len", "3"])
    result = throughput.run_mode(args, "sequential", throughput.build_workload(args))
    gc.collect()
    assert len(runners) == 1 and runners[0]() is None
    assert result["_tracer"].all_steps and result["generated_tokens"] == 6


def test_compile_clock_counts_persistent_cache_events_by_phase():
    from jax import monitoring
    clock = throughput.CompileClock()
    monitoring.record_event("/jax/compilation_cache/cache_misses")
    clock.phase = "timed_run"
    for _ in range(2):
        monitoring.record_event("/jax/compilation_cache/cache_hits")
    monitoring.record_event("/jax/compilation_cache/tasks_using_cache")  # not a hit or a miss
    assert clock.cache == {"startup": {"hits": 0, "misses": 1}, "timed_run": {"hits": 2, "misses": 0}}
