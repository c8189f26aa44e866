"""bench.overlap and bench.pipelines on the CPU: tiny shapes, every mechanism and mode runs,
and the overlap statistic reads a kernel timeline correctly."""

from __future__ import annotations

import json
import math
import re
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
    Split = overlap.Split
    assert overlap.parse_splits("88/44,100/all,all,88") == [Split(88, 44), Split(100, None), Split(None, None),
                                                            Split(88, 88)]
    assert overlap.parse_splits("100/32x4, 100/32x4:bk64:s2:w8,66/all:w8:bk32") == [
        Split(100, 32, programs_per_sm=4),
        Split(100, 32, programs_per_sm=4, block_k=64, num_stages=2, num_warps=8),
        Split(66, None, num_warps=8, block_k=32)]
    splits = overlap.parse_splits("100/32x4:bk64:s2:w8,88/44,all")
    assert overlap.parse_splits(",".join(map(str, splits))) == splits  # the text a split prints reads back


@pytest.mark.parametrize("text, names", [
    ("100/32x0", "programs per SM '0'"), ("100/32x", "programs per SM ''"), ("100/abc", "attention programs 'abc'"),
    ("100/32:zz3", "launch option 'zz3'"), ("100/32:bk0", "launch option 'bk0'"),
    ("100/32:s2:s3", "launch option 's' given twice"),
    ("0/32", "GEMM programs '0'"), ("88x2", "GEMM programs '88x2'"), ("100/", "attention programs ''"),
])
def test_parse_splits_rejects_malformed_text(text, names):
    with pytest.raises(ValueError, match=re.escape(f"split '{text}': {names}") + ".*expected GEMM"):
        overlap.parse_splits(f"88/44,{text}")


def _tiny(monkeypatch):
    monkeypatch.setattr(overlap, "M", 64)
    monkeypatch.setattr(overlap, "K", 64)
    monkeypatch.setattr(overlap, "N", 128)
    monkeypatch.setattr(overlap, "REQS", 4)
    monkeypatch.setattr(overlap, "CTX", 64)


def test_split_launch_options_reach_the_rows_with_alone_times(monkeypatch):
    _tiny(monkeypatch)
    alone_calls = []
    alone_ms = overlap.alone_ms
    monkeypatch.setattr(overlap, "alone_ms", lambda split, *a: alone_calls.append(split) or alone_ms(split, *a))
    split = overlap.parse_splits("8/4x2:bk16:s1")[0]
    # A plain (GEMM, attention) pair too, as nanoflow_jax.search.interference passes.
    rows = overlap.measure(("pair", "scan"), [split, (4, 2)], layers=1, trace=False)
    assert alone_calls == [split, overlap.Split(4, 2)]  # once per split, not per mechanism
    assert all("seq_ms_per_stage" in r and "ovl_ms_per_stage" in r for r in rows), rows
    opts = ("gemm_programs", "attn_programs", "attn_programs_per_sm", "programs", "num_splits", "block_k",
            "num_stages", "num_warps")
    # 4 SMs x 2 programs (4 requests x 8 KV heads of work: one split each); warps: decode_launch's 4.
    assert [tuple(r[k] for k in opts) for r in rows[:2]] == [(8, 4, 2, 8, 1, 16, 1, 4)] * 2
    # Defaults under a budget: one program per SM, 256-key blocks in 3 stages.
    assert [tuple(r[k] for k in opts) for r in rows[2:]] == [(4, 2, None, 2, 1, 256, 3, 4)] * 2
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("attn_alone_ms", "gemm_alone_ms")), r
        assert r["ideal_ms"] == max(r["attn_alone_ms"], r["gemm_alone_ms"])
    assert rows[0]["attn_alone_ms"] == rows[1]["attn_alone_ms"]  # one measurement shared by the split's rows


def test_every_mechanism_runs_on_cpu(tmp_path, monkeypatch):
    _tiny(monkeypatch)
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
