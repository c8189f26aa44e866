"""A/B of GEMM launch configurations on one CUPTI timeline; the winners as a GEMM table.

    python3 -m bench.gemm_ab --out ab.json --table-out table.json [--reps 20] [--runs 5]
    NANOFLOW_GEMM_TABLE=table.json python3 -m bench.kernels --sections gemm ...

`bench.gemm_tune` ranks configurations by slope timing, which drifts by a few percent
between programs timed seconds apart. Here the committed choice, each candidate and the
library run in one trace (bench.timeline), so they are compared at the same clocks. For
each (kind of GEMM, M) in CANDIDATES every op of that kind is timed at every M of
BENCH_MS that M's committed row serves (`--only kind:M,...` picks keys); a candidate wins
if its worst span ratio to the library, over those cases, beats the committed choice's by
at least MIN_GAIN. Candidates that fail to build or compute wrong results drop out.
The table keeps the committed rows (gemm_config._TUNED) and swaps in the winners, so
`$NANOFLOW_GEMM_TABLE` changes only what was won here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from bench import rel_err, run_metadata
from bench.gemm_tune import KIND, gemm_operands
from bench.timeline import LIBRARY, measure
from pallas_kernels import reference as ref
from pallas_kernels.gemm_config import _TUNED, MgpuConfig
from pallas_kernels.gemm_mgpu import gemm_mgpu

OPS = {kind: tuple(op for op, k in KIND.items() if k == kind) for kind in dict.fromkeys(KIND.values())}
BENCH_MS = (256, 512, 1024, 2048)  # bench.kernels' dense batches
MIN_GAIN = 0.01
BASE = "committed"


def _c(**kw: Any) -> MgpuConfig:
    return MgpuConfig(**kw)


# Candidates where the timelines left the committed choice under 0.95 of the library
# (bench/results/kernels_gemm_s10*_h200.json, kernels_gemm_*s11_h200.json). Session 10's
# winners (gemm_ab_s10_h200.json) are committed; its losers are gone except one
# reference each. Session 11 adds smaller CTAs that fill more SMs in one wave (the
# residual fused at M = 256, gate/up at M = 512: 896 tiles, 6.8 waves, not 448 in 3.4)
# and other 128 x 256 / 256 x 128 CTAs for the residual GEMMs at M > 512. Session 12's
# decode-row (M = 128) winners are committed (gemm_ab_s12_h200.json).
CANDIDATES: dict[tuple[str, int], dict[str, MgpuConfig]] = {
    # Session 12 (gemm_ab_s12c_h200.json): 96/112-column weight tiles, which fill SMs in
    # fewer or fuller waves, need 64/32-byte swizzles and lost everywhere: QKV at M = 256
    # 1.060 -> 0.742 (m64x96) / 0.695 (n64x96); gate/up at M = 512 0.945 -> 0.459-0.617,
    # at 256 0.989 -> 0.477. 64 x 128 CTAs chained at M = 512: 0.921-0.929 in three A/Bs.
    # QKV at M = 256 fills 96 of 132 SMs with 128 x 128 CTAs (0.916-1.046 of the library).
    # Lost in session 13 (gemm_ab_s13_h200.json: committed 22.6 us, library 23.6): half-size
    # CTAs with the split tail, 192 tiles = one wave + 60 as 120 half tiles (36.5 / 35.7 us),
    # and 128-deep K steps (27.4 us).
    # Pairs along N (cluster_n=2, one activation tile multicast per pair) lost too: 23.3 us
    # (gemm_ab_s13c_h200.json). No candidate is left for this row.
    # The split tail (the last partial wave's 13 columns as 104 half-width tiles) won here
    # chained and is committed (gemm_ab_s12d_h200.json: 0.940 -> 1.025); the reference kept is
    # the unchained one with late release (1.009).
    ("silu", 512): {
        "dr1_tail": _c(tile_m=64, tile_n=128, stages=4, delay_release=1, wg_split="m", split_tail=True),
    },
    # O + residual at M = 256 (15.8-15.9 us, 1.04-1.13 of the library) keeps 128 x 64 CTAs,
    # the residual fused. Down + residual, its reduction 3.5 times deeper, now has a row of
    # its own ("residual_deep"): 128 x 128 CTAs with 2 K splits, 46.4-47.1 us against
    # 47.5-48.5 in four A/Bs; the fused row is its reference. Lost in session 13
    # (gemm_ab_s13*_h200.json, down + residual): 64 x 128 CTAs (53.8 us), 128 x 64 in 6
    # stages (54.7), 128-deep K steps (56.6), 128 x 64 in pairs along N (cuBLAS runs 1 x 2
    # clusters here; ours 57.3).
    ("residual_deep", 256): {
        "m64x64_fused": _c(tile_m=64, tile_n=64, stages=8, delay_release=1, wg_split="m"),
    },
    # The rows for M > 512, timed at M = 1024 and 2048 (gemm_ab_s11_h200.json, worst ratio):
    # QKV's winner, 64 x 128 warpgroups walking groups of 8 M tiles (0.893 -> 0.961), is now
    # committed (pairs 0.929, chained 0.80); the residual GEMMs kept theirs (0.953; 0.902-0.955).
    ("plain", 2048): {
        "m64x128_pairs": _c(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m", cluster_m=2),
        "m64x128_group16": _c(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m", group_m=16),
    },
    ("residual", 2048): {
        "n128x128_chained_group8": _c(tile_m=128, tile_n=128, stages=4, chain_tiles=True, group_m=8),
        # The committed row's 128 x 256 CTAs with late release instead of chained tiles,
        # and 256 x 128 CTAs (warpgroups split along M: each weight tile feeds 256 rows).
        "n128x128_dr1": _c(tile_m=128, tile_n=128, stages=4, delay_release=1),
        "m128x128_chained": _c(tile_m=128, tile_n=128, stages=4, wg_split="m", chain_tiles=True),
        "m128x128_dr1": _c(tile_m=128, tile_n=128, stages=4, delay_release=1, wg_split="m"),
        # Session 13: O + residual at 1024 read 0.945 (XLA's dot 44.0 us, ours 46.6; 128 CTAs,
        # one wave, each CTA loading a 4096 x 256 weight slice): CTA pairs along M multicast
        # each weight tile to both, halving the weight reads from L2. No winner (worst ratio
        # over O and down + residual at 1024 / 2048: 0.952-0.953 vs 0.952, gemm_ab_s13b_h200.json).
        "n128x128_pairs_chained": _c(tile_m=128, tile_n=128, stages=4, chain_tiles=True, cluster_m=2),
        "n128x128_pairs_dr1": _c(tile_m=128, tile_n=128, stages=4, delay_release=1, cluster_m=2),
    },
}
# Down + residual at M > 512 shares the O + residual row and its candidates (the residual
# row's A/B judged both ops together until session 13).
CANDIDATES["residual_deep", 2048] = CANDIDATES["residual", 2048]


def committed(kind: str, m: int) -> MgpuConfig:
    """The committed row for this kind at M (ignoring any $NANOFLOW_GEMM_TABLE)."""
    return next(cfg for bound, cfg in _TUNED[kind] if m <= bound)


def row_ms(kind: str, m: int) -> list[int]:
    """M and every BENCH_MS that the same committed row serves: a row's winner must hold
    on all of them."""
    return sorted({m} | {mm for mm in BENCH_MS if committed(kind, mm) is committed(kind, m)})


def expected(op: str, m: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The operands of `op` at M (x, w, w_up, residual; unused ones None) and the
    f32-accumulating reference result every candidate is checked against."""
    x, w, up, r = gemm_operands(op, m)
    if op == "gate_up_silu":
        return (x, w, up, None), ref.gemm_silu_mul(x, w, up)
    r = r if op.endswith("_res") else None
    return (x, w, None, r), ref.gemm(x, w, residual=r)


def check(operands: tuple[jax.Array, ...], want: jax.Array, cfg: MgpuConfig) -> float:
    """Relative error of our GEMM with cfg against `want` (see `expected`)."""
    x, w, up, r = operands
    return rel_err(gemm_mgpu(x, w, w_up=up, residual=r, config=cfg), want)


def decide(rows: list[dict[str, Any]], kind: str, m: int, names: list[str]) -> dict[str, Any]:
    """Worst span ratio (library / ours) over the kind's ops and the Ms its row serves, per
    variant (those missing from rows dropped out); the winner."""
    span = {(r["case"], r["variant"]): r["span_us"] for r in rows}
    worst = {}
    for name in [BASE] + names:
        ratios = []
        for op in OPS[kind]:
            for mm in row_ms(kind, m):
                case = f"{op}:{mm}"
                lib = min(span[case, v] for v in LIBRARY if (case, v) in span)
                ratios.append(lib / span[case, name] if (case, name) in span else 0.0)
        worst[name] = min(ratios)
    best = max(names, key=worst.get)
    won = worst[best] >= worst[BASE] + MIN_GAIN
    return {"kind": kind, "m": m, "worst_ratio": worst, "winner": best if won else BASE}


def table(decisions: list[dict[str, Any]]) -> dict[str, list[list[Any]]]:
    """The committed rows with each winner in the row its M falls in, in gemm_tune's
    --table-out format."""
    out = {kind: [[bound, cfg] for bound, cfg in rows] for kind, rows in _TUNED.items()}
    for d in decisions:
        if d["winner"] != BASE:
            row = next(r for r in out[d["kind"]] if d["m"] <= r[0])
            row[1] = CANDIDATES[d["kind"], d["m"]][d["winner"]]
    return {kind: [[b, dataclasses.asdict(c)] for b, c in rows] for kind, rows in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--table-out", required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", help="kind:M,... of CANDIDATES to run (default: all)")
    a = p.parse_args()
    keys = [k for k in CANDIDATES if not a.only or f"{k[0]}:{k[1]}" in a.only.split(",")]
    cases, configs, errors = [], {}, {}
    for kind, m in keys:
        for op in OPS[kind]:
            for mm in row_ms(kind, m):
                if (op, mm) not in configs:
                    cases.append((op, mm))
                configs.setdefault((op, mm), {BASE: None})
                operands, want = expected(op, mm)
                for name, cfg in CANDIDATES[kind, m].items():
                    try:
                        err = check(operands, want, cfg)
                    except Exception as exc:  # noqa: BLE001 - a candidate that fails to build drops out
                        err = repr(exc)[:300]
                    errors[f"{op}:{mm}:{name}"] = err
                    if isinstance(err, float) and err < 1e-2:
                        configs[op, mm][name] = cfg
                    else:
                        print(f"dropped {name} for {op} at M={mm}: {err}", flush=True)
    rows = measure(cases, a.reps, a.runs, configs)
    decisions = [decide(rows, kind, m, list(CANDIDATES[kind, m])) for kind, m in keys]
    for d in decisions:
        print(f"{d['kind']:>8} M={d['m']:<5} winner {d['winner']:>20}  worst library/ours: "
              + ", ".join(f"{k} {v:.3f}" for k, v in d["worst_ratio"].items()), flush=True)
    meta = run_metadata("bench.gemm_ab")
    candidates = {f"{k}:{m}": {n: dataclasses.asdict(c) for n, c in cs.items()} for (k, m), cs in CANDIDATES.items()}
    Path(a.out).write_text(json.dumps(dict(meta=meta, candidates=candidates, rel_err=errors, rows=rows,
                                           decisions=decisions), indent=1))
    tab = table(decisions)
    Path(a.table_out).write_text(json.dumps(dict(meta=meta, configs=tab), indent=1, default=float))


if __name__ == "__main__":
    main()
