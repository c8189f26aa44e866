"""bench.ncu_summary and bench.ncu_gemm's report: Nsight Compute CSV -> per-kernel and per-call rows."""

from __future__ import annotations

import pytest

from bench import ncu_gemm
from bench.ncu_summary import summarize

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
        '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value",'
        '"Rule Name","Rule Type","Rule Description"')
ROW = ('"{id}","1","py","h","{name}","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","S","{metric}",'
       '"{unit}","{value}","","",""')


def _csv(kernels: list[tuple[str, str, str]]) -> str:
    """(name, value, unit) per kernel -> an ncu CSV of gpu__time_duration.sum rows."""
    return "\n".join(["==PROF== noise", HEAD] + [ROW.format(id=i, name=n, metric="gpu__time_duration.sum",
                                                                  unit=u, value=v)
                                                      for i, (n, v, u) in enumerate(kernels)])


def test_ncu_summary_reads_kernels_metrics_and_labels():
    row = lambda i, name, metric, value: ROW.format(id=i, name=name, metric=metric, unit="u", value=value)  # noqa: E731
    rule = ('"1","1","py","h","k2","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","S","","","","R","OPT",'
            '"a 6.6 - way bank conflict across loads"')
    text = "\n".join(["==PROF== noise", HEAD, row(0, "k1", "Duration", "48,224"),
                      row(0, "k1", "L2 Hit Rate", "65.26"), row(1, "k2", "Duration", "1,000"), rule])
    rows = summarize(text, ["ours", "library"])
    assert [r["kernel"] for r in rows] == ["k1", "k2"]
    assert rows[0]["duration_ns"] == 48224.0 and rows[0]["l2_hit_pct"] == 65.26
    assert rows[1]["call"] == "library" and "bank conflict" in rows[1]["rules"][0]


def test_report_sums_each_calls_kernels_between_markers():
    m = ncu_gemm.MARKER
    kernels = [(m, "900", "ns"), ("nvjet_gemm", "40,000", "ns"),             # xla_dot: one kernel
               (m, "900", "ns"), ("anonymous_mosaic_gpu_kernel", "30", "us"),  # ours: split K,
               ("loop_reduce_fusion", "4,000", "ns"),                          # then its sum
               (m, "900", "ns"), ("nvjet_gemm", "0.0381", "ms")]               # cuBLAS
    order = [{"case": "o_res:256", "variant": v} for v in ("xla_dot", "ours", "torch_cublas")]
    calls = ncu_gemm.per_call(summarize(_csv(kernels)), order)
    assert [c["ns"] for c in calls] == pytest.approx([40000.0, 34000.0, 38100.0])
    assert calls[1]["kernels"] == ["anonymous_mosaic_gpu_kernel", "loop_reduce_fusion"]
    row = ncu_gemm.ratios(calls)["o_res:256"]
    assert row["library_ns"] == pytest.approx(38100.0) and row["vs_library"] == pytest.approx(38100 / 34000)
    with pytest.raises(ValueError, match="markers"):
        ncu_gemm.per_call(summarize(_csv(kernels[:3])), order)


def test_default_cases_cover_every_shape_and_batch():
    cases = ncu_gemm.DEFAULT_CASES.split(",")
    assert len(cases) == len(ncu_gemm.MS) * 4 and "gate_up_silu:128" in cases and "down_res:2048" in cases
