"""`bench.throughput --tensor-parallel-size 3`: the run is split over 3 devices and the
per-device numbers and the share of optimal are per device."""

from __future__ import annotations

import json

import pytest

from bench import throughput
from tests.benchmarks.test_throughput import TINY


@pytest.mark.slow
def test_throughput_reports_per_device(tmp_path):
    out = tmp_path / "r.json"
    code = throughput.main([*TINY, "--tensor-parallel-size", "3", "--num-prompts", "3", "--input-len", "8",
                            "--output-len", "4", "--token-buckets", "32", "--output-json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["devices"] == 3 and r["engine"]["tensor_parallel_size"] == 3 and r["failed_requests"] == 0
    assert r["total_tokens_per_s_per_device"] == pytest.approx(r["total_tokens_per_s"] / 3)
    assert r["output_tokens_per_s_per_device"] == pytest.approx(r["output_tokens_per_s"] / 3)
    optimal = 2.0e12 / (2 * r["params"])
    assert r["fraction_of_optimal"] == pytest.approx(r["total_tokens_per_s"] / 3 / optimal)
