"""Mosaic GPU GEMM launch configurations on Llama-3-8B shapes, against the library GEMM.

    python -m bench.gemm_tune --out bench/results/gemm_tune.json [--ms 128,256,512,1024,2048]

For each dense batch M and each of the model's four GEMMs (QKV, O + residual,
gate/up + SiLU, down + residual) it times `pallas_kernels.gemm_mgpu` under a set
of candidate configurations (warpgroup split, tile, pipeline depth, delayed
release, tile order, residual staging slots, split K at M <= 512), checks each result against XLA's
dot, and reports the best next to the faster of XLA's dot and cuBLAS on the same
shape. `choose_config` in pallas_kernels/gemm_mgpu.py is set from these results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench import device_ms, library_gemm_ms, rel_err, run_metadata
from pallas_kernels import reference as ref
from pallas_kernels._common import num_sms
from pallas_kernels.gemm_config import SMEM_BYTES, MgpuConfig, choose_config
from pallas_kernels.gemm_mgpu import gemm_mgpu

E, F, QKV = 4096, 14336, 6144
SHAPES = {"qkv": (E, QKV), "o_res": (E, E), "gate_up_silu": (E, F), "down_res": (F, E)}
SMOKE_SHAPES = {"qkv": (64, 384), "o_res": (64, 256), "gate_up_silu": (64, 128), "down_res": (128, 256)}


def deepest(cfg: MgpuConfig, silu: bool) -> MgpuConfig | None:
    """cfg with the deepest TMA pipeline that fits in shared memory (None: none fits)."""
    fits = [s for s in (2, 3, 4, 5, 6)
            if dataclasses.replace(cfg, stages=s).smem_bytes(silu) <= SMEM_BYTES]
    return dataclasses.replace(cfg, stages=max(fits)) if fits else None


def tiles(n: int, silu: bool) -> list[MgpuConfig]:
    """Warpgroup tiles (split, tile_m, tile_n) whose CTA width divides N."""
    shapes = ([("n", 128, 64), ("m", 64, 128), ("n", 64, 64)] if silu else
              [("n", 128, 128), ("m", 64, 256), ("m", 64, 128), ("n", 128, 64), ("m", 64, 192),
               ("m", 128, 128)])
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
        self.args = (x, w, extra if self.silu else r)
        self.flops = 2 * m * kd * nd * (2 if self.silu else 1)
        self.lib = library_gemm_ms(m, nd * (2 if self.silu else 1), kd)
        self.want = (ref.gemm_silu_mul(x, w, extra) if self.silu
                     else ref.gemm(x, w, residual=r if self.has_res else None))
        self.rows: list[dict[str, Any]] = []
        self.deadline = float("inf")

    def fn(self, cfg: MgpuConfig):
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
            row["err"] = rel_err(jax.jit(self.fn(cfg))(*self.args), self.want)
            row["ms"] = device_ms(self.fn(cfg), *self.args, reps=1 if self.interpret else 5,
                                  repeats=1 if self.interpret else 3)
            row["tflops"] = self.flops / row["ms"] / 1e9
            row["vs_library"] = self.lib["best_ms"] / row["ms"]
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
            row["error"] = str(exc)[:300]
        self.rows.append(row)

    def ranked_rows(self) -> list[dict[str, Any]]:
        """Rows that ran and matched the reference, fastest first."""
        return sorted((r for r in self.rows if "ms" in r and r["err"] < 1e-2), key=lambda r: r["ms"])

    def ranked(self) -> list[MgpuConfig]:
        return [MgpuConfig(**r["config"]) for r in self.ranked_rows()]

    def search(self, deadline: float) -> dict[str, Any]:
        self.deadline = deadline
        self.time(choose_config(self.m, self.n, self.silu, self.has_res,
                                num_sms()), default=True)
        for cfg in tiles(self.n, self.silu):  # 1: tiles, delayed release, deepest pipeline
            if not (self.interpret and self.rows[1:]):
                self.time(deepest(cfg, self.silu))
        for cfg in self.ranked()[:2]:  # 2: the best two without delay / with 4 residual slots
            self.time(deepest(dataclasses.replace(cfg, delay_release=0), self.silu))
            if self.has_res:
                self.time(deepest(dataclasses.replace(cfg, out_slots=4), self.silu))
        best = next(iter(self.ranked()), None)
        for g in (4, 8) if best else ():  # 3: tile order
            self.time(dataclasses.replace(best, group_m=g))
        if self.m <= 512 and not self.silu:  # 4: split K, where few output tiles leave SMs idle
            for cfg in self.ranked()[:2]:
                for splits in (2, 4):
                    self.time(deepest(dataclasses.replace(cfg, k_splits=splits), self.silu))
        top = next(iter(self.ranked_rows()), None)
        lib_tflops = self.flops / self.lib["best_ms"] / 1e9
        print(f"M={self.m:5d} {self.op:13s} library {lib_tflops:6.1f} TFLOP/s | default "
              f"{self.rows[0].get('vs_library', float('nan')):.3f} | best "
              f"{top['vs_library'] if top else float('nan'):.3f} {top and top['config']}", flush=True)
        return {"m": self.m, "op": self.op, "n": self.n, "k": self.k, "library": self.lib,
                "library_tflops": lib_tflops, "rows": self.rows, "best": top}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gemm_tune.json")
    ap.add_argument("--ms", default="128,256,512,1024,2048")
    ap.add_argument("--ops", default=",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    a = ap.parse_args(argv)
    seed = int(time.time())
    res: dict[str, Any] = {"meta": {**run_metadata("bench.gemm_tune"), "seed": seed}, "shapes": []}
    key = jax.random.key(seed)
    deadline = time.time() + a.budget_s
    for m in (int(v) for v in a.ms.split(",")):
        for op in a.ops.split(","):
            key, sub = jax.random.split(key)
            res["shapes"].append(ShapeTuner(m, op, sub, a.smoke).search(deadline))
            Path(a.out).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
