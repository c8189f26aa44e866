"""Why a GEMM times slower in a chained benchmark than alone: the same kernels timed several ways.

    python3 -m bench.chain_probe --mode time --out probe.json
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv
        python3 -m bench.chain_probe --mode profile --out order.json > kernels.csv

`time`: our committed GEMM and XLA's dot per case, timed by `bench.timing.device_ms` in
each of its modes (patched, also with one weight copy; ordered; slope; weights rotated
past L2) and as back-to-back single calls. Run it again with
XLA_FLAGS=--xla_gpu_enable_command_buffer= to see what XLA's CUDA graphs add. `profile`: one run of each chained program between
cudaProfilerStart/Stop, so Nsight Compute lists every kernel a chain launches.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bench import run_metadata, torch_module
from bench.gemm_tune import gemm_operands
from bench.timing import chained, cold_copies, copies_of, device_ms, time_fn
from pallas_kernels.gemm_mgpu import gemm_mgpu

REPS = 4


def case_fns(op: str, m: int) -> tuple[dict[str, Callable[..., Any]], tuple[Any, ...]]:
    """{name: fn(x, w, r)} for our kernel and the library dot, and the arguments."""
    if op == "gate_up_silu":
        raise ValueError("chain_probe covers the single-weight GEMMs (qkv, o_res, down_res)")
    res = op.endswith("_res")
    x, w, _, r = gemm_operands(op, m)
    ours = lambda a, b, c: gemm_mgpu(a, b, residual=c if res else None)  # noqa: E731
    lib = lambda a, b, c: jnp.dot(a, b)  # noqa: E731
    return {"ours": ours, "xla_dot": lib}, (x, w, r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="o_res:1024,o_res:2048,qkv:1024")
    p.add_argument("--mode", choices=("time", "profile"), default="time")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch = torch_module()
    rows, order, runs = [], [], []
    for case in args.cases.split(","):
        op, m = case.split(":")
        fns, (x, w, r) = case_fns(op, int(m))
        copies = cold_copies(w.size * 2)
        ws = copies_of(w, copies)
        for name, fn in fns.items():
            if args.mode == "time":
                rows.append({
                    "case": case, "fn": name, "copies": copies,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "chain_rotated_ms": device_ms(fn, x, ws, r, reps=max(5, copies), rotate=(1,),
                                                  mode="patched"),
                    "chain_one_copy_ms": device_ms(fn, x, w, r, reps=max(5, copies), mode="patched"),
                    "ordered_ms": device_ms(fn, x, ws, r, reps=max(5, copies), rotate=(1,), mode="ordered"),
                    "slope_ms": device_ms(fn, x, ws, r, reps=max(5, copies), rotate=(1,), mode="slope"),
                    "single_calls_ms": time_fn(jax.jit(fn), x, w, r, iters=50),
                })
                print(rows[-1], flush=True)
            else:
                run = chained(fn, REPS, rotate=(1,))
                jax.block_until_ready(run(x, ws, r))
                runs.append((case, name, run, (x, ws, r)))
    if args.mode == "profile" and torch is not None:
        torch.cuda.profiler.start()
        for case, name, run, a in runs:
            jax.block_until_ready(run(*a))
            order += [{"case": case, "fn": name, "call": i} for i in range(REPS)]  # one per kernel
        torch.cuda.profiler.stop()
    Path(args.out).write_text(json.dumps(dict(run_metadata("bench.chain_probe"), rows=rows,
                                              profiled_in_order=order), indent=1))


if __name__ == "__main__":
    main()
