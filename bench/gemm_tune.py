"""Mosaic GPU GEMM launch configurations on Llama-3-8B shapes, against the library GEMM.

    python -m bench.gemm_tune --out bench/results/gemm_tune.json [--ms 128,256,512,1024,2048]

For each dense batch M and each of the model's four GEMMs (QKV, O + residual,
gate/up + SiLU, down + residual) it times `pallas_kernels.gemm_mgpu` under a set
of candidate configurations (warpgroup split, tile, pipeline depth, delayed
release, tile order, residual staging slots, tiles chained in one pipeline, 128-deep K
steps, CTA pairs sharing weight tiles, split K at M <= 512), with the weights rotated
past L2, checks each result against XLA's dot, and reports the best next to the faster
of XLA's dot and cuBLAS on the same shape. The `confirm` step re-times the leaders and
the committed choice, interleaved with the library, and ranks by medians.
`choose_config` (pallas_kernels/gemm_config.py) is set from these results;
`--table-out` writes them for $NANOFLOW_GEMM_TABLE.
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
from bench.timing import cold_copies, copies_of, device_ms
from pallas_kernels import reference as ref
from pallas_kernels._common import num_sms
from pallas_kernels.gemm_config import SMEM_BYTES, MgpuConfig, choose_config, gemm_kind
from pallas_kernels.gemm_mgpu import gemm_mgpu

E, F, QKV = 4096, 14336, 6144
SHAPES = {"qkv": (E, QKV), "o_res": (E, E), "gate_up_silu": (E, F), "down_res": (F, E)}
STEPS = ("tiles", "release", "chain", "tile_k", "slots", "order", "cluster", "split", "confirm")
CONFIRM_ROUNDS = 3  # re-timings of the leaders, interleaved with the library
SMOKE_SHAPES = {"qkv": (64, 384), "o_res": (64, 256), "gate_up_silu": (64, 128), "down_res": (128, 256)}


def gemm_operands(op: str, m: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [m, K], w and w_up [K, N] (scaled like a layer's weights) and residual [m, N] in
    bf16 for one of SHAPES (the timeline, A/B and Nsight benchmarks share them)."""
    k, n = SHAPES[op]
    keys = jax.random.split(jax.random.key(m), 4)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16) * 0.03
    up = jax.random.normal(keys[2], (k, n), jnp.bfloat16) * 0.03
    r = jax.random.normal(keys[3], (m, n), jnp.bfloat16)
    return x, w, up, r


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
        """Re-times the committed choice and the `leaders` fastest rows `rounds` times,
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
        for r in picks:
            r["confirmed_ms"] = statistics.median(r["confirm_ms"])
            r["vs_library"] = self.lib["confirmed_best_ms"] / r["confirmed_ms"]

    def ranked(self) -> list[MgpuConfig]:
        return [MgpuConfig(**r["config"]) for r in self.ranked_rows()]

    def search(self, deadline: float, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
        """Times the committed choice, then each search step in `steps` (STEPS order)."""
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


# The `_TUNED` kind each op's GEMM is chosen by, from its Llama-3-8B shape.
KIND = {op: gemm_kind(op == "gate_up_silu", op.endswith("_res"), n, k) for op, (k, n) in SHAPES.items()}


def best_table(shapes: list[dict[str, Any]]) -> dict[str, list[list[Any]]]:
    """Per kind of GEMM and M, the configuration with the least total time over that
    kind's shapes (gemm_config.gemm_kind: one op each on Llama shapes), as `choose_config` reads it
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gemm_tune.json")
    ap.add_argument("--ms", default="128,256,512,1024,2048")
    ap.add_argument("--ops", default=",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--steps", default=",".join(STEPS), help="search steps to run, of " + ",".join(STEPS))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    ap.add_argument("--table-out", help="also write the winners as a table for $NANOFLOW_GEMM_TABLE")
    a = ap.parse_args(argv)
    if unknown := set(a.steps.split(",")) - set(STEPS):
        ap.error(f"unknown --steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    seed = int(time.time())
    res: dict[str, Any] = {"meta": {**run_metadata("bench.gemm_tune"), "seed": seed}, "shapes": []}
    key = jax.random.key(seed)
    deadline = time.time() + a.budget_s
    for m in (int(v) for v in a.ms.split(",")):
        for op in a.ops.split(","):
            key, sub = jax.random.split(key)
            res["shapes"].append(ShapeTuner(m, op, sub, a.smoke).search(deadline, tuple(a.steps.split(","))))
            Path(a.out).write_text(json.dumps(res, indent=1, default=float))
            if a.table_out:
                Path(a.table_out).write_text(json.dumps(
                    {"meta": res["meta"], "configs": best_table(res["shapes"])}, indent=1))


if __name__ == "__main__":
    main()
