"""bench.gemm_tune's table of winners (what $NANOFLOW_GEMM_TABLE feeds choose_config)."""

from __future__ import annotations

from bench.gemm_tune import best_table


def _row(cfg: dict, ms: float, err: float = 1e-3) -> dict:
    return {"config": cfg, "ms": ms, "err": err}


def test_best_table_sums_over_a_kinds_shapes_and_skips_wrong_results():
    a, b, c = {"tile_m": 64}, {"tile_m": 128}, {"tile_m": 256}
    shapes = [
        # o_res (residual) and down_res (residual_deep) are kinds of their own; c is wrong
        {"m": 128, "op": "o_res", "rows": [_row(a, 1.0), _row(b, 1.5), _row(c, 0.1, err=0.5)]},
        {"m": 128, "op": "down_res", "rows": [_row(a, 5.0), _row(b, 3.0)]},
        {"m": 128, "op": "o_res", "rows": [_row(a, 1.2), _row(b, 1.6)]},  # a second o_res run: summed
        {"m": 128, "op": "qkv", "rows": [_row(a, 2.0), {"config": b, "error": "no compile"}]},
        {"m": 256, "op": "qkv", "rows": [_row(b, 2.0), _row(c, 1.0)]},
    ]
    table = best_table(shapes)
    assert table["residual"] == [[128, a]] and table["residual_deep"] == [[128, b]]
    assert table["plain"] == [[128, a], [256, c]]
    assert "silu" not in table


def test_best_table_prefers_confirmed_medians():
    """After `confirm`, a shape's table entry comes from the confirmed rows' medians: a
    lucky single timing (a at 0.5) loses to b's steadier median."""
    a, b = {"tile_m": 64}, {"tile_m": 128}
    rows = [dict(_row(a, 0.5), confirmed_ms=2.0), dict(_row(b, 1.0), confirmed_ms=1.1), _row({"tile_m": 32}, 0.1)]
    assert best_table([{"m": 256, "op": "qkv", "rows": rows}])["plain"] == [[256, b]]


def test_confirm_reranks_by_interleaved_medians(monkeypatch):
    """confirm() re-times the leaders and the committed choice (row 0) and ranks them
    by the median of all their timings."""
    import dataclasses

    import jax

    from bench.gemm_tune import ShapeTuner
    from pallas_kernels.gemm_config import MgpuConfig

    tuner = ShapeTuner(64, "o_res", jax.random.key(0), smoke=True)
    cfgs = [MgpuConfig(tile_m=t, epi_m=min(64, t)) for t in (16, 32, 64, 128, 256)]
    first = [5.0, 1.0, 1.2, 1.4, 9.0]   # single timings: 32 looks best
    later = {16: 5.0, 32: 3.0, 64: 1.1, 128: 1.3, 256: 1.0}
    tuner.rows = [_row(dataclasses.asdict(c), ms) for c, ms in zip(cfgs, first)]
    monkeypatch.setattr(tuner, "device_ms", lambda cfg: later[cfg.tile_m])
    tuner.confirm(leaders=3, rounds=2)
    ranked = tuner.ranked_rows()
    # leaders 32, 64, 128 plus the committed 16 are confirmed; 256 (never a leader) is not
    assert [r["config"]["tile_m"] for r in ranked] == [64, 128, 32, 16]
    assert ranked[0]["confirmed_ms"] == 1.1 and ranked[0]["confirm_ms"] == [1.2, 1.1, 1.1]
