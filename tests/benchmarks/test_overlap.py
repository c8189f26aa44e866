"""bench.overlap and bench.pipelines on the CPU: tiny shapes, every mechanism and mode runs,
and the overlap statistic reads a kernel timeline correctly."""

from __future__ import annotations

import json
import sys

import pytest

import bench.overlap as overlap
from bench import pipelines


def test_overlap_stats_counts_attention_time_beside_other_streams():
    events = [  # (name, stream, start us, duration us)
        ("gemm", 7, 0.0, 10.0),
        ("paged_decode_attention", 9, 5.0, 10.0),   # 5 of its 10 us beside the GEMM
        ("paged_decode_attention", 7, 20.0, 4.0),   # on the first GEMM's stream
        ("gemm", 9, 21.0, 2.0),                     # beside 2 us of the second attention
    ]
    stats = overlap.overlap_stats(events)
    assert stats["attention_us"] == 14.0
    # 5 us of the first attention beside stream 7's GEMM, 2 us of the second beside stream 9's.
    assert stats["attention_beside_gemm"] == pytest.approx(7.0 / 14.0, abs=1e-3)
    assert stats["streams"] == 2 and stats["kernels"] == 4 and stats["span_us"] == 24.0


def test_parse_splits():
    assert overlap.parse_splits("88/44,100/all,all") == [(88, 44), (100, None), (None, None)]


def test_every_mechanism_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(overlap, "M", 64)
    monkeypatch.setattr(overlap, "K", 64)
    monkeypatch.setattr(overlap, "N", 128)
    monkeypatch.setattr(overlap, "REQS", 4)
    monkeypatch.setattr(overlap, "CTX", 64)
    out = tmp_path / "overlap.json"
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(out), "--layers", "1", "--splits", "4/2", "--no-trace"])
    overlap.main()
    rows = json.loads(out.read_text())["rows"]
    assert {r["mechanism"] for r in rows} == set(overlap.MECHANISMS)
    assert all("seq_ms_per_stage" in r and "ovl_ms_per_stage" in r for r in rows), rows


def test_pipelines_bench_runs_every_mode_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "pipelines.json"
    monkeypatch.setattr(sys, "argv", ["x", "--model", "smollm2-135m", "--dtype", "float32", "--kernels", "xla",
                                      "--decodes", "3", "--context", "8", "--tokens", "16", "--rows", "8",
                                      "--iters", "1", "--no-trace", "--programs", "gemm=2|gemm=3",
                                      "--out", str(out)])
    pipelines.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pipeline"], r["programs"]) for r in rows] == [
        ("sequential", "whole GPU"), ("nanobatch", "whole GPU"), ("nanoflow", "whole GPU"),
        ("nanoflow", "gemm=2|gemm=3")]
    assert all(r["iteration_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="separated by"):
        pipelines.parse_programs("gemm=2")


def test_kernel_breakdown_and_timeline_plot(tmp_path):
    events = [("gemm_a", 1, 0.0, 10.0), ("paged_decode_attention", 2, 2.0, 5.0), ("gemm_a", 1, 12.0, 4.0),
              ("norm", 1, 17.0, 1.0)]
    assert pipelines.kernel_breakdown(events, top=2) == {"gemm_a": 14.0, "paged_decode_attention": 5.0,
                                                         "(other kernels)": 1.0}
    png = tmp_path / "timeline.png"
    pipelines.plot_timelines({"nanoflow": events, "sequential": events[:1]}, str(png), window_us=20.0)
    assert png.stat().st_size > 1000
