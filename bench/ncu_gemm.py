"""GPU time of our GEMMs against the library's on the same shapes, from Nsight Compute.

    ncu --profile-from-start off --clock-control none --csv --page details --print-units base
        --metrics gpu__time_duration.sum python3 -m bench.ncu_gemm --out meta.json > ncu.csv
    python -m bench.ncu_gemm --report ncu.csv --meta meta.json --out table.json

Every call (our committed GEMM as the engine runs it, XLA's dot, cuBLAS through
PyTorch) is compiled and warmed first; then each runs once between cudaProfilerStart and
cudaProfilerStop, after a one-block marker kernel (MARKER), so the kernels between two
markers are one call's: XLA's dot and split K may launch two. `--report` sums them per
call (L2 flushed before each kernel: weights come from HBM, as in a model's layers) and
writes ours / the faster library per shape. Sections (`--section ...`) instead of
`--metrics` give hardware counters; bench/ncu_summary.py reads those.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bench import run_metadata, torch_module
from bench.gemm_tune import SHAPES, gemm_operands
from bench.ncu_summary import summarize
from pallas_kernels.gemm_mgpu import gemm_mgpu

MS = (128, 256, 512, 1024, 2048)
DEFAULT_CASES = ",".join(f"{op}:{m}" for m in MS for op in SHAPES)
MARKER = "ncu_call_marker"
LIBRARY = ("xla_dot", "torch_cublas")


def variants(op: str, m: int) -> tuple[list[tuple[str, Callable[[], Any]]], list[str]]:
    """(name, zero-argument call): XLA's dot, our GEMM as the engine calls it, cuBLAS;
    and the lines of XLA's optimized HLO that say how it runs the dot."""
    k, n = SHAPES[op]
    silu, res = op == "gate_up_silu", op.endswith("_res")
    x, w, up, r = gemm_operands(op, m)
    wide = jnp.concatenate([w, up], axis=1) if silu else w
    dot = jax.jit(jnp.dot).lower(x, wide).compile()  # compiled once: called, and its HLO read
    ours = jax.jit(lambda a, b, c, u: gemm_mgpu(a, b, w_up=u if silu else None, residual=c if res else None))
    out: list[tuple[str, Callable[[], Any]]] = [("xla_dot", lambda: dot(x, wide)),
                                                ("ours", lambda: ours(x, w, r, up))]
    torch = torch_module()
    if torch is not None:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n * (2 if silu else 1), device="cuda", dtype=torch.bfloat16)
        out.append(("torch_cublas", lambda: a @ b))
    hlo = [ln.strip()[:600] for ln in dot.as_text().splitlines()
           if re.search(r"custom_call_target|__triton|block_m|tile|cublas|fusion_backend", ln)]
    return out, hlo


def marker() -> Callable[[], Any]:
    """A one-block kernel named MARKER, launched before every profiled call."""
    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    x = jnp.zeros((128,), jnp.float32)  # a whole warpgroup's copy (Mosaic GPU's minimum)
    call = jax.jit(pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((128,), jnp.float32), name=MARKER))
    return lambda: jax.block_until_ready(call(x))


def per_call(kernels: list[dict[str, Any]], order: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kernel rows (in profiling order) -> one row per call: the kernels after each marker."""
    calls: list[dict[str, Any]] = []
    for k in kernels:
        if MARKER in k["kernel"]:
            calls.append({"kernels": [], "ns": 0.0})
        elif calls:
            calls[-1]["kernels"].append(k["kernel"])
            calls[-1]["ns"] += float(k.get("duration_ns", 0.0))
    if len(calls) != len(order):
        raise ValueError(f"{len(calls)} markers in the profile for {len(order)} calls: profile cut short?")
    return [dict(o, **c) for o, c in zip(order, calls)]


def ratios(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per case: our time, the faster library's, and library / ours (>= 1: ours is faster)."""
    out: dict[str, dict[str, Any]] = {}
    for c in calls:
        out.setdefault(c["case"], {})[c["variant"]] = c["ns"]
    for row in out.values():
        lib = min(row[v] for v in LIBRARY if v in row)
        row["library_ns"], row["vs_library"] = lib, lib / row["ours"]
    return out


def report(csv_path: str, meta_path: str, out_path: str) -> None:
    meta = json.loads(Path(meta_path).read_text())
    calls = per_call(summarize(Path(csv_path).read_text()), meta["profiled_in_order"])
    table = ratios(calls)
    Path(out_path).write_text(json.dumps(dict(meta=meta["meta"], calls=calls, table=table), indent=1))
    for case, row in table.items():
        print(f"{case:>20}  ours {row['ours'] / 1e3:8.1f} us  library {row['library_ns'] / 1e3:8.1f} us"
              f"  library/ours {row['vs_library']:.3f}")


def profile(cases: str, out_path: str) -> None:
    torch = torch_module()
    if torch is None:
        raise SystemExit("bench.ncu_gemm needs PyTorch for cudaProfilerStart (and cuBLAS)")
    mark = marker()
    order, hlo, calls = [], {}, []
    for case in cases.split(","):
        op, m = case.split(":")
        runs, hlo[case] = variants(op, int(m))
        for name, call in runs:
            for _ in range(3):  # compile and warm outside the profiled region
                res = call()
            (torch.cuda.synchronize() if name == "torch_cublas" else jax.block_until_ready(res))
            calls.append((case, name, call))
    mark()
    torch.cuda.profiler.start()
    for case, name, call in calls:
        mark()
        res = call()
        (torch.cuda.synchronize() if name == "torch_cublas" else jax.block_until_ready(res))
        order.append({"case": case, "variant": name})
    torch.cuda.profiler.stop()
    Path(out_path).write_text(json.dumps(dict(meta=run_metadata("bench.ncu_gemm"), profiled_in_order=order,
                                              xla_hlo=hlo), indent=1))
    print(f"profiled {len(order)} calls; metadata in {out_path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="op:M,... (ops: " + ",".join(SHAPES) + ")")
    p.add_argument("--report", metavar="CSV", help="turn this ncu CSV (and --meta) into the table")
    p.add_argument("--meta", help="with --report: the JSON the profiling run wrote")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.report:
        if not a.meta:
            p.error("--report needs --meta (the profiling run's --out)")
        report(a.report, a.meta, a.out)
    else:
        profile(a.cases, a.out)


if __name__ == "__main__":
    main()
