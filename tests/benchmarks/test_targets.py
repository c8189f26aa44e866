"""bench.targets: the kernel targets judged from bench.kernels results."""

from __future__ import annotations

import random

from bench import targets


def _gemm_row(op: str, m: int, slope: float, span: float | None) -> dict:
    mosaic = {"vs_library": slope}
    if span is not None:
        mosaic["timeline"] = {"span_vs_library": span, "busy_vs_library": span - 0.05}
    return {"op": op, "m": m, "mosaic": mosaic}


def test_gemm_prefers_the_timeline_and_names_the_failing_shapes():
    ok = 0.95 + 0.05 * random.random()
    res = {"gemm": [_gemm_row("qkv", 256, 0.5, ok), _gemm_row("o_res", 256, 0.99, 0.949)]}
    v = targets.gemm(res)
    assert v["measure"] == "timeline span per call"
    assert v["failing"] == ["o_res:256"] and v["passed"] == 1 and v["of"] == 2 and not v["pass"]
    # Without timelines for every row, the slope ratios are judged.
    res["gemm"].append(_gemm_row("down_res", 256, 0.97, None))
    v = targets.gemm(res)
    assert v["measure"] == "slope timing" and v["failing"] == ["qkv:256"]


def test_decode_counts_long_contexts_only_and_memory_the_largest_t():
    res = {"decode_attention": [{"n": 64, "ctx": 512, "vs_copy": 0.4}, {"n": 64, "ctx": 4096, "vs_copy": 0.85}],
           "memory_bound": [{"op": "rope", "t": 2048, "vs_copy": 0.4}, {"op": "rope", "t": 16384, "vs_copy": 0.71},
                            {"op": "rms_norm_res", "t": 16384, "vs_copy": 0.69},
                            {"op": "write_kv", "t": 16384, "vs_copy": 0.1}]}
    v = targets.check([res])
    assert v["decode_attention"]["pass"] and list(v["decode_attention"]["ratios"]) == ["64x4096"]
    assert v["rmsnorm_rope"]["failing"] == ["rms_norm_res:16384"] and v["rmsnorm_rope"]["of"] == 2


def test_the_last_result_that_measured_a_target_counts():
    old = {"gemm": [_gemm_row("qkv", 256, 0.5, 0.5)]}
    new = {"gemm": [_gemm_row("qkv", 256, 0.5, 0.99)], "decode_attention": []}
    v = targets.check([old, new])
    assert v["gemm"]["pass"] and "decode_attention" not in v
    lines = targets.report(v)
    assert lines == ["[target] gemm: PASS 1/1 >= 0.95 (timeline span per call; worst qkv:256 0.990)"]


def test_median_over_runs_judges_each_shape_by_its_middle_run():
    """A shape at 0.94 in one of three runs passes on its median; one under the line in
    two of three fails. Runs that did not measure a target do not count for it."""
    hi = 0.96 + 0.03 * random.random()
    runs = [[{"gemm": [_gemm_row("qkv", 256, 0.5, 0.94), _gemm_row("o_res", 256, 0.5, 0.93)]}],
            [{"gemm": [_gemm_row("qkv", 256, 0.5, hi), _gemm_row("o_res", 256, 0.5, 0.94)]}],
            [{"gemm": [_gemm_row("qkv", 256, 0.5, hi + 0.01), _gemm_row("o_res", 256, 0.5, 0.99)]},
             {"decode_attention": [{"n": 64, "ctx": 2048, "vs_copy": 0.85}]}]]
    v = targets.median_check(runs)
    assert v["gemm"]["ratios"]["qkv:256"] == hi and v["gemm"]["failing"] == ["o_res:256"]
    assert v["gemm"]["measure"].startswith("median of 3 runs")
    assert v["decode_attention"]["pass"] and v["decode_attention"]["measure"].startswith("median of 1 runs")
