"""The interference model: defaults that match the result files they cite, interpolation,
validation, the JSON round trip, and profiling that refuses to run off a GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nanoflow_jax.search.interference import DEFAULT, Interference, Point, measure_interference, pair_factor
from nanoflow_jax.search.profile import ProfileUnavailable

ROOT = Path(__file__).resolve().parents[2]


def test_every_default_point_matches_the_result_file_it_cites():
    points = DEFAULT.points[("compute", "memory")]
    assert len(points) >= 4
    for point in points:
        path, gemm, attn = re.match(r"(bench/results/\S+\.json): (\d+)/(\d+)", point.source).groups()
        rows = json.loads((ROOT / path).read_text())["rows"]
        row = next(r for r in rows if r["mechanism"] == "streams2" and r["gemm_programs"] == int(gemm)
                   and r["attn_programs"] == int(attn))
        # Two chains alternating the ops: overlapped perfectly they would take half of back to back.
        chain = row["ovl_ms_per_stage"] / row["seq_ms_per_stage"] / 0.5
        assert point.memory_share == pytest.approx(int(attn) / (int(gemm) + int(attn)))
        if "pair" in point.source:   # 88/44: the mean of the chain and the notes' single pair
            pair = (1.225 / 1.60) / (0.965 / (0.495 + 0.965))
            assert point.factor == pytest.approx((chain + pair) / 2, abs=1e-3)
        else:
            assert point.factor == pytest.approx(chain, abs=1e-3)
        assert point.factor >= 1.0


def test_pair_factor_by_hand():
    # The notes' 88/44 pair: 1.60 ms back to back, 1.225 overlapped; alone 0.495 and 0.965 ms.
    assert pair_factor(1.225, 1.60, 0.965 / 1.46) == pytest.approx(0.765625 / 0.660959, rel=1e-5)
    with pytest.raises(ValueError):
        pair_factor(1.0, 0.0, 0.5)


def test_factor_interpolates_in_the_memory_share_and_clamps():
    table = Interference(points={("compute", "memory"): (Point(0.25, 1.1), Point(0.5, 1.3))}, unmeasured=1.5)
    assert table.factor("compute", 99, "memory", 33) == pytest.approx(1.1)       # f = 0.25
    assert table.factor("compute", 66, "memory", 66) == pytest.approx(1.3)       # f = 0.5
    assert table.factor("memory", 49.5, "compute", 82.5) == pytest.approx(1.2)   # f = 0.375, either order
    assert table.factor("compute", 120, "memory", 12) == pytest.approx(1.1)      # below: the first point
    assert table.factor("compute", 12, "memory", 120) == pytest.approx(1.3)      # above: the last
    assert table.factor("memory", 66, "memory", 66) == 1.5                       # no points: unmeasured
    assert table.min_factor() == pytest.approx(1.1)


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="below 1"):
        Interference(points={("compute", "memory"): (Point(0.3, 0.9),)})
    with pytest.raises(ValueError, match="strictly increasing"):
        Interference(points={("compute", "memory"): (Point(0.5, 1.1), Point(0.3, 1.2))})
    with pytest.raises(ValueError, match="kinds"):
        Interference(points={("compute", "io"): ()})
    path = tmp_path / "i.json"
    DEFAULT.save(path)
    back = Interference.load(path)
    assert back == DEFAULT
    path.write_text("[]")
    with pytest.raises(ValueError, match="not an interference table"):
        Interference.load(path)


def test_interference_profiling_needs_a_gpu():
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(ProfileUnavailable, match="--interference FILE"):
        measure_interference()


@pytest.mark.gpu
def test_measure_interference_on_a_gpu():
    table = measure_interference(splits=((88, 44),), layers=2, log=lambda _: None)
    (point,) = table.points[("compute", "memory")]
    assert point.memory_share == pytest.approx(1 / 3) and point.factor >= 1.0 and "measured" in point.source
