"""bench.gemm_tune: the search's table of winners (what $NANOFLOW_GEMM_TABLE feeds
choose_config), and the A/B step: candidates are launchable, winners need a margin, the
table swaps in only winners."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from bench import gemm_tune, shapes
from bench.gemm_tune import best_table
from pallas_kernels import gemm_config
from pallas_kernels.gemm_config import SMEM_BYTES, MgpuConfig


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
    """confirm() re-times the leaders and the tuned choice (row 0) and ranks them
    by the median of all their timings."""
    import jax

    tuner = gemm_tune.ShapeTuner(64, "o_res", jax.random.key(0), smoke=True)
    cfgs = [MgpuConfig(tile_m=t, epi_m=min(64, t)) for t in (16, 32, 64, 128, 256)]
    first = [5.0, 1.0, 1.2, 1.4, 9.0]   # single timings: 32 looks best
    later = {16: 5.0, 32: 3.0, 64: 1.1, 128: 1.3, 256: 1.0}
    tuner.rows = [_row(dataclasses.asdict(c), ms) for c, ms in zip(cfgs, first)]
    monkeypatch.setattr(tuner, "device_ms", lambda cfg: later[cfg.tile_m])
    tuner.confirm(leaders=3, rounds=2)
    ranked = tuner.ranked_rows()
    # leaders 32, 64, 128 plus the tuned 16 are confirmed; 256 (never a leader) is not
    assert [r["config"]["tile_m"] for r in ranked] == [64, 128, 32, 16]
    assert ranked[0]["confirmed_ms"] == 1.1 and ranked[0]["confirm_ms"] == [1.2, 1.1, 1.1]


def test_confirm_past_the_deadline_keeps_the_search_timings():
    """A search whose budget ran out before the first confirm round still ranks its
    leaders (by their one timing) instead of failing the whole run."""
    import jax

    tuner = gemm_tune.ShapeTuner(64, "o_res", jax.random.key(0), smoke=True)
    cfgs = [MgpuConfig(tile_m=t, epi_m=min(64, t)) for t in (16, 32, 64)]
    tuner.rows = [_row(dataclasses.asdict(c), ms) for c, ms in zip(cfgs, [2.0, 1.0, 1.5])]
    tuner.deadline = 0.0
    tuner.confirm(leaders=2, rounds=3)
    assert [r["config"]["tile_m"] for r in tuner.ranked_rows()] == [32, 64, 16]
    assert tuner.ranked_rows()[0]["confirmed_ms"] == 1.0


@pytest.mark.parametrize("key", list(gemm_tune.CANDIDATES))
def test_candidates_fit_a_hopper_sm(key):
    silu = key[0] == "silu"
    for cfg in gemm_tune.CANDIDATES[key].values():
        assert cfg.smem_bytes(silu) <= SMEM_BYTES, cfg
        assert not (silu and cfg.k_splits > 1), cfg


def _rows(m: int, spans: dict[str, dict[str, float]]) -> list[dict]:
    """spans: op -> variant -> us."""
    return [dict(case=f"{op}:{m}", variant=v, span_us=us) for op, vs in spans.items() for v, us in vs.items()]


def test_a_winner_must_beat_the_tuned_row_by_the_margin():
    lib = 40.0 + random.random()
    names = ["a", "b"]
    # a: 2% faster than the tuned row, b slower; the library's faster variant counts.
    rows = _rows(256, {"o_res": {"tuned": 50.0, "a": 49.0, "b": 56.0, "torch_cublas": lib, "xla_dot": lib + 5}})
    d = gemm_tune.decide(rows, "residual", 256, names)
    assert d["winner"] == "a"
    assert d["worst_ratio"]["b"] == pytest.approx(lib / 56.0)
    # Within MIN_GAIN of the tuned row: keep it.
    rows = _rows(256, {"down_res": {"tuned": 50.0, "a": 49.9, "b": 60.0, "xla_dot": lib}})
    assert gemm_tune.decide(rows, "residual_deep", 256, names)["winner"] == "tuned"


def test_o_and_down_residual_gemms_are_judged_as_their_own_kinds():
    assert shapes.OPS["residual"] == ("o_res",) and shapes.OPS["residual_deep"] == ("down_res",)
    assert gemm_config.gemm_kind(False, True, 4096, 14336) == "residual_deep"
    assert gemm_config.gemm_kind(False, True, 4096, 4096) == "residual"


def test_a_rows_winner_must_hold_at_every_m_the_row_serves():
    assert gemm_tune.served_ms("plain", 2048) == [1024, 2048]  # the M > 512 row
    assert gemm_tune.served_ms("silu", 512) == [512] and gemm_tune.served_ms("residual_deep", 256) == [256]
    lib = 100.0
    # "a" wins at 2048 but loses at 1024; "b" was dropped (no rows) at 1024.
    rows = (_rows(1024, {"qkv": {"tuned": 101.0, "a": 120.0, "xla_dot": lib}})
            + _rows(2048, {"qkv": {"tuned": 110.0, "a": 100.0, "b": 90.0, "xla_dot": lib}}))
    d = gemm_tune.decide(rows, "plain", 2048, ["a", "b"])
    assert d["worst_ratio"]["a"] == pytest.approx(lib / 120.0) and d["worst_ratio"]["b"] == 0.0
    assert d["winner"] == "tuned"


def test_table_swaps_in_only_the_winners(tmp_path, monkeypatch):
    name, cfg = next(iter(gemm_tune.CANDIDATES["silu", 512].items()))
    tuned_1024 = gemm_config.choose_config(1024, 14336, True, False, 132)
    decisions = [{"kind": "silu", "m": 512, "winner": name}, {"kind": "residual", "m": 256, "winner": "tuned"}]
    tab = gemm_tune.ab_table(decisions)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"configs": tab}))
    loaded = gemm_config.load_table(str(path))
    for kind, rows in gemm_config.tuned_table().items():
        assert [b for b, _ in loaded[kind]] == [b for b, _ in rows]
        for (bound, got), (_, was) in zip(loaded[kind], rows):
            assert got == (cfg if (kind, bound) == ("silu", 512) else was)
    monkeypatch.setenv(gemm_config.TABLE_ENV, str(path))
    assert gemm_config.choose_config(512, 14336, True, False, 132) == cfg
    assert gemm_config.choose_config(1024, 14336, True, False, 132) == tuned_1024


# Every candidate computes the GEMM in the Mosaic GPU interpreter (on the GPU, the A/B
# checks each one's output too), on two tiles a dimension.
# A key that shares another's candidates (residual_deep at M > 512) is not run twice.
_SETS = list({id(named): key for key, named in gemm_tune.CANDIDATES.items()}.values())
CANDIDATES = [(key, name) for key in _SETS for name in gemm_tune.CANDIDATES[key]]


@pytest.mark.parametrize("key,name", CANDIDATES, ids=[f"{k[0]}{k[1]}-{n}" for k, n in CANDIDATES])
def test_candidates_compute_the_gemm_in_the_interpreter(key, name):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.gemm_mgpu import gemm_mgpu

    cfg = gemm_tune.CANDIDATES[key][name]
    m, n, k = 2 * cfg.cta_m * cfg.cluster_m, 2 * cfg.cta_n, 2 * cfg.tile_k * cfg.k_splits
    ks = jax.random.split(jax.random.key(random.randrange(1 << 30)), 4)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(ks[1], (k, n), jnp.bfloat16) * 0.1
    r = jax.random.normal(ks[2], (m, n), jnp.bfloat16) if key[0].startswith("residual") else None
    u = jax.random.normal(ks[3], (k, n), jnp.bfloat16) * 0.1 if key[0] == "silu" else None
    out = gemm_mgpu(x, w, w_up=u, residual=r, interpret=True, config=cfg, num_programs=3)
    f32 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    want = f32(x) @ f32(w) + (f32(r) if r is not None else 0.0)
    if u is not None:
        want = want / (1.0 + np.exp(-want)) * (f32(x) @ f32(u))
    assert np.linalg.norm(f32(out) - want) / np.linalg.norm(want) < 1e-2


def test_check_compares_each_op_with_its_own_reference(monkeypatch):
    """The A/B's correctness gate: each op's operands and reference, and a GEMM that drops
    the residual or SiLU x up fails it (a stand-in GEMM on CPU, small shapes)."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(shapes, "SHAPES", {op: (64, 32) for op in shapes.SHAPES})
    f32 = jnp.float32

    def right(x, w, *, w_up=None, residual=None, config=None):
        acc = jnp.dot(x.astype(f32), w.astype(f32))
        if w_up is not None:
            acc = jax.nn.silu(acc) * jnp.dot(x.astype(f32), w_up.astype(f32))
        return (acc if residual is None else acc + residual.astype(f32)).astype(x.dtype)

    cfg = next(iter(gemm_tune.CANDIDATES["plain", 2048].values()))
    for op in shapes.SHAPES:
        operands, want = gemm_tune.expected(op, 8)
        monkeypatch.setattr(gemm_tune, "gemm_mgpu", right)
        assert gemm_tune.check(operands, want, cfg) < 1e-2
        if op != "qkv":  # a GEMM without its epilogue
            monkeypatch.setattr(gemm_tune, "gemm_mgpu", lambda x, w, **kw: jnp.dot(x, w))
            assert gemm_tune.check(operands, want, cfg) > 1e-2
