"""Mosaic GPU GEMM launch configurations on Llama-3-8B shapes, against the library GEMM.

    python -m bench.gemm_tune --out tune.json --table-out table.json [--ms 128,256,512,1024,2048]
    python -m bench.gemm_tune --ab --out ab.json --table-out table.json [--only silu:512,...]
    NANOFLOW_GEMM_TABLE=table.json python -m bench.kernels --sections gemm ...

Search (default): for each dense batch M and each of the model's four GEMMs (QKV, O +
residual, gate/up + SiLU, down + residual) it times `pallas_kernels.gemm_mgpu` under a
staged set of candidate configurations (warpgroup split, tile, pipeline depth, delayed
release, tile order, residual staging slots, tiles chained in one pipeline, 128-deep K
steps, CTA pairs sharing weight tiles, split K at M <= 512), with the weights rotated past
L2, checks each result against XLA's dot, and reports the best next to the faster of XLA's
dot and cuBLAS on the same shape. The `confirm` step re-times the leaders and the tuned
choice, interleaved with the library, and ranks by medians.

A/B (`--ab`): slope timing drifts by a few percent between programs timed seconds apart,
so the finalists of a search (CANDIDATES) are settled on one CUPTI timeline
(bench.timeline): the tuned row, each candidate and the library run at the same clocks.
For each (kind of GEMM, M) every op of that kind is timed at every M of AB_MS that M's
tuned row serves; a candidate wins if its worst span ratio to the library over those
cases beats the tuned row's by at least MIN_GAIN. Candidates that fail to build or
compute wrong results drop out.

`--table-out` writes the winners for $NANOFLOW_GEMM_TABLE, with the device's name (the
A/B's table is the device's tuned table with only the winners swapped in). A table that
holds up in `bench.kernels` runs ships as pallas_kernels/tuned/gemm_<device>.json, its
last row's M bound set to null so that it serves every larger M.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench import library_gemm_ms, rel_err, run_metadata
from bench.shapes import GEMM_MS, KIND, OPS, SHAPES, SMOKE, gemm_operands, gemm_shapes
from bench.timing import cold_copies, copies_of, device_ms
from pallas_kernels import reference as ref
from pallas_kernels._common import num_sms
from pallas_kernels.gemm_config import SMEM_BYTES, MgpuConfig, choose_config, current_device, tuned_table
from pallas_kernels.gemm_mgpu import gemm_mgpu

STEPS = ("tiles", "release", "chain", "tile_k", "slots", "order", "cluster", "split", "confirm")
CONFIRM_ROUNDS = 3  # re-timings of the leaders, interleaved with the library
SMOKE_SHAPES = gemm_shapes(SMOKE)


def deepest(cfg: MgpuConfig, silu: bool, k_iters: int = 0) -> MgpuConfig | None:
    """cfg with the deepest TMA pipeline that fits in shared memory (None: none fits);
    chained tiles also need the K steps per tile (k_iters) to divide into stages."""
    fits = [s for s in (2, 3, 4, 5, 6)
            if dataclasses.replace(cfg, stages=s).smem_bytes(silu) <= SMEM_BYTES
            and not (cfg.chain_tiles and k_iters % s)]
    return dataclasses.replace(cfg, stages=max(fits)) if fits else None


def tiles(n: int, silu: bool) -> list[MgpuConfig]:
    """Warpgroup tiles (split, tile_m, tile_n) whose CTA width divides N."""
    shapes = ([("n", 128, 64), ("m", 64, 128), ("n", 64, 64)] if silu else
              [("n", 128, 128), ("m", 64, 256), ("m", 64, 128), ("n", 128, 64), ("m", 64, 192),
               ("m", 128, 128), ("n", 64, 64)])
    out = [MgpuConfig(tile_m=tm, tile_n=tn, wg_split=sp, delay_release=1) for sp, tm, tn in shapes]
    return [c for c in out if n % c.cta_n == 0]


class ShapeTuner:
    """Times configurations of one GEMM shape; a staged search keeps the count small."""

    def __init__(self, m: int, op: str, key: jax.Array, smoke: bool = False) -> None:
        kd, nd = (SMOKE_SHAPES if smoke else SHAPES)[op]
        self.interpret = smoke
        self.m, self.op, self.n, self.k = m, op, nd, kd
        self.silu, self.has_res = op == "gate_up_silu", op.endswith("_res")
        k1, k2, k3, k4 = jax.random.split(key, 4)
        rnd = lambda k, *s, scale=1.0: (jax.random.normal(k, s, jnp.float32) * scale).astype(jnp.bfloat16)  # noqa: E731
        x, w, extra, r = rnd(k1, m, kd), rnd(k2, kd, nd, scale=1 / 30), rnd(k3, kd, nd, scale=1 / 30), rnd(k4, m, nd)
        # Weights rotate through copies that together exceed L2, as a model's layers do.
        self.copies = 1 if smoke else cold_copies(2 * kd * nd * (2 if self.silu else 1))
        self.args = (x, copies_of(w, self.copies), copies_of(extra, self.copies) if self.silu else r)
        self.rotate = (1, 2) if self.silu else (1,)
        self.flops = 2 * m * kd * nd * (2 if self.silu else 1)
        self.lib = library_gemm_ms(m, nd * (2 if self.silu else 1), kd)
        self.want = (ref.gemm_silu_mul(x, w, extra) if self.silu
                     else ref.gemm(x, w, residual=r if self.has_res else None))
        self.rows: list[dict[str, Any]] = []
        self.deadline = float("inf")
        self._fns: dict[MgpuConfig, Any] = {}

    def fn(self, cfg: MgpuConfig):
        """One function object per configuration, so re-timing it reuses its compile."""
        if cfg not in self._fns:
            self._fns[cfg] = self._make_fn(cfg)
        return self._fns[cfg]

    def _make_fn(self, cfg: MgpuConfig):
        if self.silu:
            return lambda a, b, c: gemm_mgpu(a, b, w_up=c, config=cfg, interpret=self.interpret)
        return lambda a, b, c: gemm_mgpu(a, b, residual=c if self.has_res else None, config=cfg,
                                         interpret=self.interpret)

    def time(self, cfg: MgpuConfig | None, default: bool = False) -> None:
        """Checks and times cfg once (skipped: None, already timed, or past the deadline)."""
        if cfg is None or any(r["config"] == dataclasses.asdict(cfg) for r in self.rows) \
                or time.time() > self.deadline:
            return
        row: dict[str, Any] = {"config": dataclasses.asdict(cfg), "default": default}
        try:
            first = [a[0] if i in self.rotate else a for i, a in enumerate(self.args)]
            row["err"] = rel_err(jax.jit(self.fn(cfg))(*first), self.want)
            row["ms"] = self.device_ms(cfg)
            row["tflops"] = self.flops / row["ms"] / 1e9
            row["vs_library"] = self.lib["best_ms"] / row["ms"]
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
            row["error"] = str(exc)[:300]
        self.rows.append(row)

    def device_ms(self, cfg: MgpuConfig) -> float:
        return device_ms(self.fn(cfg), *self.args, reps=1 if self.interpret else max(5, self.copies),
                         repeats=1 if self.interpret else 3, rotate=self.rotate)

    def ranked_rows(self) -> list[dict[str, Any]]:
        """Rows that ran and matched the reference, fastest first; after `confirm`, only
        the confirmed ones, by their median."""
        return sorted(_ranked(self.rows), key=row_ms)

    def confirm(self, leaders: int = 3, rounds: int = CONFIRM_ROUNDS) -> None:
        """Re-times the tuned choice and the `leaders` fastest rows `rounds` times,
        interleaved with the library, and keeps medians: one timing of a small-M GEMM
        moves 10-30% between runs, more than most differences between configurations."""
        picks = self.ranked_rows()[:leaders]
        if self.rows and "ms" in self.rows[0] and self.rows[0] not in picks:
            picks.append(self.rows[0])
        lib = [self.lib["best_ms"]]
        for _ in range(rounds):
            if time.time() > self.deadline:
                break
            for r in picks:
                r.setdefault("confirm_ms", [r["ms"]]).append(self.device_ms(MgpuConfig(**r["config"])))
            if not self.interpret:
                lib.append(library_gemm_ms(self.m, self.n * (2 if self.silu else 1), self.k)["best_ms"])
        self.lib["confirmed_best_ms"] = statistics.median(lib)
        for r in picks:   # past the deadline before a round: the search's own timing
            r["confirmed_ms"] = statistics.median(r.get("confirm_ms", [r["ms"]]))
            r["vs_library"] = self.lib["confirmed_best_ms"] / r["confirmed_ms"]

    def ranked(self) -> list[MgpuConfig]:
        return [MgpuConfig(**r["config"]) for r in self.ranked_rows()]

    def search(self, deadline: float, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
        """Times the tuned choice, then each search step in `steps` (STEPS order)."""
        self.deadline = deadline
        self.time(choose_config(self.m, self.n, self.silu, self.has_res,
                                num_sms(), k=self.k), default=True)
        if "tiles" in steps:  # warpgroup tiles, delayed release, deepest pipeline
            for cfg in tiles(self.n, self.silu):
                if not (self.interpret and self.rows[1:]):
                    self.time(deepest(cfg, self.silu))
        for cfg in self.ranked()[:2]:  # the best two without delay, chained, 4 residual slots
            if "release" in steps:
                self.time(deepest(dataclasses.replace(cfg, delay_release=0), self.silu))
            if "chain" in steps:
                self.time(deepest(dataclasses.replace(cfg, delay_release=0, chain_tiles=True),
                                  self.silu, self.k // cfg.tile_k))
            if "tile_k" in steps:  # 128-deep K steps: half the pipeline round trips per byte
                self.time(deepest(dataclasses.replace(cfg, tile_k=128), self.silu, self.k // 128))
            if "slots" in steps and self.has_res:
                self.time(deepest(dataclasses.replace(cfg, out_slots=4), self.silu))
        best = next(iter(self.ranked()), None)
        for g in (4, 8) if best and "order" in steps else ():  # tile order
            self.time(dataclasses.replace(best, group_m=g))
        if "cluster" in steps and self.m >= 256:  # CTA pairs share weight tiles (multicast)
            for cfg in self.ranked()[:3]:
                if cfg.cluster_m == 1:
                    self.time(dataclasses.replace(cfg, cluster_m=2))
        if "split" in steps and self.m <= 512 and not self.silu:  # split K: few output tiles
            for cfg in self.ranked()[:2]:
                for splits in (2, 4, 8) if self.m <= 128 else (2, 4):
                    if self.k % (cfg.tile_k * splits) == 0:  # no split made of K padding alone
                        self.time(deepest(dataclasses.replace(cfg, k_splits=splits), self.silu,
                                          self.k // (cfg.tile_k * splits)))
            # Every tile with the split that brings its work units closest to one per SM:
            # wide tiles read the activations once per wider weight panel (less traffic per
            # weight byte at decode sizes) and split K gives back the parallelism.
            for cfg in tiles(self.n, self.silu):
                units = -(-self.m // cfg.cta_m) * (self.n // cfg.cta_n)
                splits = max((s for s in (2, 4, 8, 16) if units * s <= num_sms()
                              and self.k % (cfg.tile_k * s) == 0), default=0)
                if splits:
                    self.time(deepest(dataclasses.replace(cfg, k_splits=splits), self.silu,
                                      self.k // (cfg.tile_k * splits)))
        if "confirm" in steps:
            self.confirm()
        top = next(iter(self.ranked_rows()), None)
        lib_tflops = self.flops / self.lib.get("confirmed_best_ms", self.lib["best_ms"]) / 1e9
        default = self.rows[0].get("vs_library", float("nan")) if self.rows else float("nan")
        print(f"M={self.m:5d} {self.op:13s} library {lib_tflops:6.1f} TFLOP/s | default "
              f"{default:.3f} | best "
              f"{top['vs_library'] if top else float('nan'):.3f} {top and top['config']}", flush=True)
        return {"m": self.m, "op": self.op, "n": self.n, "k": self.k, "library": self.lib,
                "library_tflops": lib_tflops, "rows": self.rows, "best": top}


def row_ms(row: dict[str, Any]) -> float:
    """A row's time: the median of its confirmation timings when it has them."""
    return row.get("confirmed_ms", row["ms"])


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that ran and matched the reference; only the confirmed ones if any are."""
    ok = [r for r in rows if "ms" in r and r["err"] < 1e-2]
    return [r for r in ok if "confirmed_ms" in r] or ok


def best_table(shapes: list[dict[str, Any]]) -> dict[str, list[list[Any]]]:
    """Per kind of GEMM and M, the configuration with the least total time over that
    kind's shapes (bench.shapes.KIND: one op each on Llama shapes), as `choose_config` reads it
    ($NANOFLOW_GEMM_TABLE): {kind: [[M, config], ...]} by increasing M."""
    table: dict[str, list[list[Any]]] = {}
    for kind in dict.fromkeys(KIND.values()):
        for m in sorted({sh["m"] for sh in shapes}):
            runs = [sh for sh in shapes if sh["m"] == m and KIND[sh["op"]] == kind]
            ok = [{json.dumps(r["config"], sort_keys=True): row_ms(r) for r in _ranked(sh["rows"])}
                  for sh in runs]
            ok = [o for o in ok if o]
            if not ok:
                continue
            common = set(ok[0]).intersection(*ok[1:])
            pool = {c: sum(o[c] for o in ok) for c in common} or ok[0]
            table.setdefault(kind, []).append([m, json.loads(min(pool, key=pool.get))])
    return table


# ---- A/B on one timeline -------------------------------------------------------------

AB_MS = (256, 512, 1024, 2048)  # bench.kernels' dense prefill batches
MIN_GAIN = 0.01
BASE = "tuned"
_DR = dict(delay_release=1, wg_split="m")

# The finalists the A/B settles against the tuned rows, per (kind, M): the closest
# runners-up of the searches and A/Bs so far (bench/RESULTS.md, GEMM table), kept so a
# new device or JAX version can re-check them in one call.
CANDIDATES: dict[tuple[str, int], dict[str, MgpuConfig]] = {
    # The tuned row chains the tiles and splits the tail; this one releases operands late.
    ("silu", 512): {"dr1_tail": MgpuConfig(tile_m=64, tile_n=128, stages=4, split_tail=True, **_DR)},
    # The deep row splits K on 128 x 128 CTAs; this is O + residual's fused 128 x 64 row.
    ("residual_deep", 256): {"m64x64_fused": MgpuConfig(tile_m=64, tile_n=64, stages=8, **_DR)},
    # QKV past M = 512: CTA pairs sharing weight tiles, and wider M groups.
    ("plain", 2048): {
        "m64x128_pairs": MgpuConfig(tile_m=64, tile_n=128, stages=6, cluster_m=2, **_DR),
        "m64x128_group16": MgpuConfig(tile_m=64, tile_n=128, stages=6, group_m=16, **_DR),
    },
    # The residual GEMMs past M = 512: the tuned 128 x 256 CTAs grouped, releasing late
    # instead of chained, or in pairs that multicast each weight tile; 256 x 128 CTAs
    # (warpgroups split along M: each weight tile feeds 256 rows).
    ("residual", 2048): {
        "n128x128_chained_group8": MgpuConfig(tile_m=128, tile_n=128, stages=4, chain_tiles=True, group_m=8),
        "n128x128_dr1": MgpuConfig(tile_m=128, tile_n=128, stages=4, delay_release=1),
        "m128x128_chained": MgpuConfig(tile_m=128, tile_n=128, stages=4, wg_split="m", chain_tiles=True),
        "m128x128_dr1": MgpuConfig(tile_m=128, tile_n=128, stages=4, **_DR),
        "n128x128_pairs_chained": MgpuConfig(tile_m=128, tile_n=128, stages=4, chain_tiles=True, cluster_m=2),
        "n128x128_pairs_dr1": MgpuConfig(tile_m=128, tile_n=128, stages=4, delay_release=1, cluster_m=2),
    },
}
# Down + residual past M = 512 shares O + residual's rows, so it tries the same candidates.
CANDIDATES["residual_deep", 2048] = CANDIDATES["residual", 2048]


def device_table() -> dict[str, tuple[tuple[float, MgpuConfig], ...]]:
    """This device's tuned table (ignoring $NANOFLOW_GEMM_TABLE), which the A/B measures
    candidates against."""
    table = tuned_table()
    if table is None:
        raise SystemExit(f"no tuned GEMM table for {current_device()}: run the search "
                         "(`python -m bench.gemm_tune --table-out T.json`) first and ship its table")
    return table


def row_bound(kind: str, m: int) -> float:
    """The M bound of the tuned row that serves this kind at M."""
    return next(bound for bound, _ in device_table()[kind] if m <= bound)


def served_ms(kind: str, m: int) -> list[int]:
    """M and every AB_MS that the same tuned row serves: a row's winner must hold on all."""
    return sorted({m} | {mm for mm in AB_MS if row_bound(kind, mm) == row_bound(kind, m)})


def expected(op: str, m: int) -> tuple[tuple[jax.Array | None, ...], jax.Array]:
    """The operands of `op` at M (x, w, w_up, residual; unused ones None) and the
    f32-accumulating reference result every candidate is checked against."""
    x, w, up, r = gemm_operands(op, m)
    if op == "gate_up_silu":
        return (x, w, up, None), ref.gemm_silu_mul(x, w, up)
    r = r if op.endswith("_res") else None
    return (x, w, None, r), ref.gemm(x, w, residual=r)


def check(operands: tuple[jax.Array | None, ...], want: jax.Array, cfg: MgpuConfig) -> float:
    """Relative error of our GEMM with cfg against `want` (see `expected`)."""
    x, w, up, r = operands
    return rel_err(gemm_mgpu(x, w, w_up=up, residual=r, config=cfg), want)


def decide(rows: list[dict[str, Any]], kind: str, m: int, names: list[str]) -> dict[str, Any]:
    """Worst span ratio (library / ours) over the kind's ops and the Ms its row serves, per
    variant (those missing from rows dropped out); the winner."""
    from bench.timeline import LIBRARY  # noqa: PLC0415 - the profiler stack only for --ab

    span = {(r["case"], r["variant"]): r["span_us"] for r in rows}
    worst = {}
    for name in [BASE] + names:
        ratios = []
        for op in OPS[kind]:
            for mm in served_ms(kind, m):
                case = f"{op}:{mm}"
                lib = min(span[case, v] for v in LIBRARY if (case, v) in span)
                ratios.append(lib / span[case, name] if (case, name) in span else 0.0)
        worst[name] = min(ratios)
    best = max(names, key=worst.get)
    won = worst[best] >= worst[BASE] + MIN_GAIN
    return {"kind": kind, "m": m, "worst_ratio": worst, "winner": best if won else BASE}


def ab_table(decisions: list[dict[str, Any]]) -> dict[str, list[list[Any]]]:
    """The device's tuned rows with each winner in the row its M falls in, in the
    --table-out format (an unbounded last row as null)."""
    out = {kind: [[bound, cfg] for bound, cfg in rows] for kind, rows in device_table().items()}
    for d in decisions:
        if d["winner"] != BASE:
            row = next(r for r in out[d["kind"]] if d["m"] <= r[0])
            row[1] = CANDIDATES[d["kind"], d["m"]][d["winner"]]
    return {kind: [[None if b == float("inf") else b, dataclasses.asdict(c)] for b, c in rows]
            for kind, rows in out.items()}


def run_ab(only: str | None, reps: int, runs: int) -> dict[str, Any]:
    """Checks every candidate of the chosen keys (`only`: "kind:M,..."; default all), times
    the survivors, the tuned rows and the library on one timeline, and decides each key."""
    from bench.timeline import measure  # noqa: PLC0415

    keys = [k for k in CANDIDATES if not only or f"{k[0]}:{k[1]}" in only.split(",")]
    cases, configs, errors = [], {}, {}
    for kind, m in keys:
        for op in OPS[kind]:
            for mm in served_ms(kind, m):
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
    rows = measure(cases, reps, runs, configs)
    decisions = [decide(rows, kind, m, list(CANDIDATES[kind, m])) for kind, m in keys]
    for d in decisions:
        print(f"{d['kind']:>13} M={d['m']:<5} winner {d['winner']:>24}  worst library/ours: "
              + ", ".join(f"{k} {v:.3f}" for k, v in d["worst_ratio"].items()), flush=True)
    candidates = {f"{k}:{m}": {n: dataclasses.asdict(c) for n, c in cs.items()} for (k, m), cs in CANDIDATES.items()}
    return dict(candidates=candidates, rel_err=errors, rows=rows, decisions=decisions)


def search(a: argparse.Namespace, meta: dict[str, Any]) -> None:
    """The staged search over a.ms x a.ops; results and the table rewritten after each shape."""
    seed = int(time.time())
    res: dict[str, Any] = {"meta": {**meta, "seed": seed}, "shapes": []}
    key = jax.random.key(seed)
    deadline = time.time() + a.budget_s
    for m in (int(v) for v in a.ms.split(",")):
        for op in a.ops.split(","):
            key, sub = jax.random.split(key)
            res["shapes"].append(ShapeTuner(m, op, sub, a.smoke).search(deadline, tuple(a.steps.split(","))))
            Path(a.out).write_text(json.dumps(res, indent=1, default=float))
            if a.table_out:
                Path(a.table_out).write_text(json.dumps(
                    {"meta": res["meta"], "device": current_device(), "configs": best_table(res["shapes"])}, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gemm_tune.json")
    ap.add_argument("--table-out", help="also write the winners as a table for $NANOFLOW_GEMM_TABLE")
    ap.add_argument("--ms", default=",".join(map(str, GEMM_MS)), help="search: dense batch sizes M")
    ap.add_argument("--ops", default=",".join(SHAPES), help="search: ops, of " + ",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=400.0, help="search: time budget")
    ap.add_argument("--steps", default=",".join(STEPS), help="search: steps to run, of " + ",".join(STEPS))
    ap.add_argument("--smoke", action="store_true", help="search: tiny shapes, interpreted (CPU)")
    ap.add_argument("--ab", action="store_true", help="A/B the CANDIDATES on one timeline instead of searching")
    ap.add_argument("--only", help="A/B: kind:M,... of CANDIDATES to run (default: all)")
    ap.add_argument("--reps", type=int, default=20, help="A/B: calls per traced program")
    ap.add_argument("--runs", type=int, default=5, help="A/B: traced runs of each program (median)")
    a = ap.parse_args(argv)
    if unknown := set(a.steps.split(",")) - set(STEPS):
        ap.error(f"unknown --steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    meta = run_metadata("bench.gemm_tune")
    if not a.ab:
        search(a, meta)
        return
    res = run_ab(a.only, a.reps, a.runs)
    Path(a.out).write_text(json.dumps(dict(meta=meta, **res), indent=1))
    if a.table_out:
        Path(a.table_out).write_text(json.dumps(dict(meta=meta, device=current_device(),
                                                     configs=ab_table(res["decisions"])), indent=1))


if __name__ == "__main__":
    main()
