"""bench.gemm_tune's table of winners (what $NANOFLOW_GEMM_TABLE feeds choose_config)."""

from __future__ import annotations

from bench.gemm_tune import best_table


def _row(cfg: dict, ms: float, err: float = 1e-3) -> dict:
    return {"config": cfg, "ms": ms, "err": err}


def test_best_table_sums_over_a_kinds_shapes_and_skips_wrong_results():
    a, b, c = {"tile_m": 64}, {"tile_m": 128}, {"tile_m": 256}
    shapes = [
        # residual: a wins o_res alone, b wins the sum over o_res + down_res; c is wrong
        {"m": 128, "op": "o_res", "rows": [_row(a, 1.0), _row(b, 1.5), _row(c, 0.1, err=0.5)]},
        {"m": 128, "op": "down_res", "rows": [_row(a, 5.0), _row(b, 3.0)]},
        {"m": 128, "op": "qkv", "rows": [_row(a, 2.0), {"config": b, "error": "no compile"}]},
        {"m": 256, "op": "qkv", "rows": [_row(b, 2.0), _row(c, 1.0)]},
    ]
    table = best_table(shapes)
    assert table["residual"] == [[128, b]]
    assert table["plain"] == [[128, a], [256, c]]
    assert "silu" not in table
