"""bench.serving against the shared test server (few prompts): every request completes, the
numbers are consistent with the workload, the JSON and PNG are written. Lives beside the
server tests to reuse their server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import serving

pytestmark = pytest.mark.slow


def test_serving_benchmark_sweep(server, tmp_path):
    out, png = tmp_path / "serving.json", tmp_path / "serving.png"
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps({"total_tokens_per_s": 100.0, "output_tokens_per_s": 20.0}))
    argv = ["--base-url", server, "--num-prompts", "6", "--input-len", "12", "--output-len", "3",
            "--request-rate", "20,inf", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:1",
            "--offline-json", str(offline), "--out", str(out), "--plot", str(png)]
    assert serving.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"] == "SmolLM2-135M-Instruct" and result["jax"]
    assert [r["request_rate"] for r in result["runs"]] == [20.0, "inf"]
    for r in result["runs"]:
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["total_output_tokens"] == 18 and r["total_prompt_tokens"] == 72
        assert r["request_throughput"] == pytest.approx(6 / r["duration_s"])
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"]
        # tpot:1 ms is out of reach on a CPU: nobody meets both SLOs
        assert r["goodput"]["requests_meeting_slo"] == 0
        assert r["fraction_of_offline_total"] == pytest.approx(r["total_token_throughput"] / 100.0)
    assert png.stat().st_size > 10_000


def test_summary_percentiles_and_goodput_against_numpy():
    rng = np.random.default_rng(0)
    results = []
    for _ in range(50):
        r = serving.RequestResult(prompt_len=10, ok=True, ttft=float(rng.uniform(0.1, 1.0)),
                                  output_tokens=int(rng.integers(2, 9)))
        r.itl = list(rng.uniform(0.01, 0.05, r.output_tokens - 1))
        r.e2el = r.ttft + sum(r.itl)
        results.append(r)
    results.append(serving.RequestResult(prompt_len=10, error="HTTP 503"))
    s = serving.summarize(results, 10.0, {"ttft": 500.0, "tpot": 30.0})
    ok = results[:50]
    assert s["completed"] == 50 and s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["ttft_ms"]["p90"] == pytest.approx(1e3 * np.percentile([r.ttft for r in ok], 90))
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok]
    assert s["tpot_ms"]["p99"] == pytest.approx(1e3 * np.percentile(tpot, 99))
    good = sum(r.ttft <= 0.5 and t <= 0.030 for r, t in zip(ok, tpot))
    assert s["goodput"]["requests_meeting_slo"] == good and s["goodput"]["request_goodput"] == good / 10.0
    assert s["output_throughput"] == sum(r.output_tokens for r in ok) / 10.0


def test_arrivals_and_flags():
    t = serving.arrival_times(20000, 4.0, 1.0, seed=1)
    assert t[0] == 0 and np.all(np.diff(t) >= 0) and np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.03)
    assert not serving.arrival_times(5, math.inf, 1.0, 0).any()
    assert serving.parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    assert serving.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["e2el:0"]):
        with pytest.raises(ValueError):
            serving.parse_goodput(bad)
    with pytest.raises(ValueError):
        serving.parse_rates("0")
