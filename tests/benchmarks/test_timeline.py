"""bench.timeline: kernel records of a trace -> runs -> per-call span, busy time and gaps."""

from __future__ import annotations

import functools
import json
import random

import pytest

from bench import timeline


def _xla_trace(kernels: list[tuple[str, float, float]]) -> dict:
    """A jax.profiler-style trace: kernels on a GPU stream thread, plus host events and
    XLA's derived "XLA Ops" line on the same device, which must not count twice."""
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    host = [{"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 5.0, "name": "PjitFunction(run)"}]
    stream = [{"ph": "X", "pid": 2, "tid": 7, "ts": ts, "dur": d, "name": n} for n, ts, d in kernels]
    derived = [{"ph": "X", "pid": 2, "tid": 9, "ts": ts, "dur": d, "name": "fusion"} for _, ts, d in kernels]
    events = meta + host + stream + derived
    random.shuffle(events)
    return {"traceEvents": events}


def _program(start: float, calls: int, dur: float, gap: float, name: str = "k") -> list[tuple[str, float, float]]:
    return [(name, start + i * (dur + gap), dur) for i in range(calls)]


def test_reads_only_gpu_stream_kernels_in_start_order():
    kernels = _program(100.0, 4, 10.0, 2.0)
    events = timeline.gpu_kernel_events(_xla_trace(kernels))
    assert events == kernels


def test_reads_torch_kernel_records():
    trace = [{"ph": "X", "cat": "kernel", "ts": 5.0, "dur": 3.0, "name": "nvjet"},
             {"ph": "X", "cat": "cpu_op", "ts": 1.0, "dur": 9.0, "name": "aten::mm"}]
    assert timeline.gpu_kernel_events(trace) == [("nvjet", 5.0, 3.0)]


def test_runs_split_at_the_pauses_and_stats_per_call():
    calls, dur, gap = 5, 40.0 + random.random(), 1.0 + random.random()
    runs = [_program(s, calls, dur, gap) for s in (0.0, 2000.0, 4500.0)]
    split = timeline.split_runs([e for r in runs for e in r], 3)
    assert split == runs
    stats = timeline.summarize(split, calls)
    # span: 5 kernels and 4 gaps over 5 calls.
    assert stats["span_us"] == pytest.approx((calls * dur + (calls - 1) * gap) / calls)
    assert stats["busy_us"] == pytest.approx(dur) and stats["gap_us"] == pytest.approx(gap)
    assert stats["kernels_per_call"] == 1 and stats["kernels"] == ["k"]


def test_rounds_run_every_call_once_a_round_and_regroup_per_call():
    log, rounds = [], 2 + random.randrange(3)
    calls = [functools.partial(log.append, name) for name in "abc"]
    timeline.in_rounds(calls, rounds, lambda _: None)
    assert log == list("abc") * rounds
    per_run = [[(name, float(i), 1.0)] for i, name in enumerate(log)]
    per_call = timeline.runs_by_call(per_run, 3, rounds)
    assert [{e[0] for r in runs for e in r} for runs in per_call] == [{"a"}, {"b"}, {"c"}]
    assert all(len(runs) == rounds for runs in per_call)
    with pytest.raises(ValueError, match="expected 3 calls"):
        timeline.runs_by_call(per_run[:-1], 3, rounds)


def test_marked_runs_ignore_a_stray_kernel_and_drop_the_markers():
    """A kernel recorded before the first run (and a pause inside a run wider than the
    pauses between runs) must not shift the runs: torch runs open with a marker kernel."""
    marker = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"
    runs = [_program(s, 3, 30.0, 1.0, name=n) for s, n in ((100.0, "a"), (150.0, "b"), (5000.0, "c"))]
    events = [("stray", 0.0, 1.0)]
    for r in runs:
        events += [(marker, r[0][1] - 5.0, 1.0)] + r
    events[-2] = (events[-2][0], events[-2][1] + 3000.0, events[-2][2])  # a long in-run pause
    split = timeline.split_marked(events, timeline.TORCH_MARKER, 3)
    assert [{e[0] for e in r} for r in split] == [{"a"}, {"b"}, {"c"}]
    assert [len(r) for r in split] == [3, 3, 3]
    with pytest.raises(ValueError, match="marker kernels recorded for 4 runs"):
        timeline.split_marked(events, timeline.TORCH_MARKER, 4)


def test_rounds_mark_each_run_before_it_starts():
    log = []
    timeline.in_rounds([lambda: log.append("call")] * 2, 2, lambda _: None, mark=lambda: log.append("mark"))
    assert log == ["mark", "call"] * 4


def test_runs_of_one_program_with_different_kernel_counts_are_refused():
    """A run cut in the wrong place (half a run, or two merged) must not become a number."""
    good = _program(0.0, 4, 10.0, 1.0)
    with pytest.raises(ValueError, match="split wrongly"):
        timeline.summarize([good, good[:2], good], 4)


def test_too_few_kernels_for_the_runs_is_an_error():
    with pytest.raises(ValueError, match="was the GPU traced"):
        timeline.split_runs([("k", 0.0, 1.0)], 2)


def test_table_compares_with_the_faster_library():
    rows = [dict(case="o_res:1024", variant="ours", span_us=50.0, busy_us=48.0, gap_us=2.0),
            dict(case="o_res:1024", variant="xla_dot", span_us=55.0, busy_us=47.0, gap_us=8.0),
            dict(case="o_res:1024", variant="torch_cublas", span_us=47.5, busy_us=46.0, gap_us=1.5)]
    t = timeline.table(rows)["o_res:1024"]
    assert t["span_vs_library"] == pytest.approx(47.5 / 50.0)
    assert t["busy_vs_library"] == pytest.approx(46.0 / 48.0)
    assert t["library"] == "torch_cublas" and t["library_span_us"] == 47.5
    # cuBLAS replayed as a CUDA graph has a span but no kernel records: it counts for span only.
    rows.append(dict(case="o_res:1024", variant="torch_cublas_graph", span_us=46.5, busy_us=None))
    t = timeline.table(rows)["o_res:1024"]
    assert t["library"] == "torch_cublas_graph" and t["span_vs_library"] == pytest.approx(46.5 / 50.0)
    assert t["busy_vs_library"] == pytest.approx(46.0 / 48.0)


def test_plot_draws_a_timeline_or_kernels_json(tmp_path):
    tab = {f"qkv:{m}": dict(span_vs_library=0.9 + random.random() / 10, busy_vs_library=0.9) for m in (256, 512)}
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"meta": {"jax_device": "test"}, "table": tab}))
    timeline.plot(str(src), str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000
    rows = [{"op": "qkv", "m": 256, "mosaic": {"timeline": tab["qkv:256"]}}, {"op": "o_res", "m": 256, "mosaic": {}}]
    assert timeline.ratio_table({"meta": {}, "gemm": rows}) == {"qkv:256": tab["qkv:256"]}
