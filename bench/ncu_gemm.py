"""Hardware counters of our GEMM against the library's on the same shapes (run under ncu).

    ncu --profile-from-start off --clock-control none --csv --page details \
        --section SpeedOfLight ... python3 -m bench.ncu_gemm --out meta.json > ncu.csv

Every variant is compiled and warmed first; only the calls between cudaProfilerStart and
cudaProfilerStop are profiled, one launch each, in the order written to --out (so the
CSV's kernels map to variants). --out also gets the HLO of XLA's dot (a cuBLAS custom
call or a Triton fusion, with its tile config) so the library's choice can be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bench import run_metadata, torch_module
from bench.gemm_tune import SHAPES
from pallas_kernels.gemm_config import MgpuConfig, choose_config
from pallas_kernels.gemm_mgpu import gemm_mgpu

# (op, M, config or None for the committed choice); the library dot runs for each (op, M).
DEFAULT_CASES = "o_res:1024,o_res:2048,qkv:1024,qkv:2048,gate_up_silu:1024,down_res:1024"
O_RES_VARIANTS = (MgpuConfig(tile_m=64, tile_n=256, stages=4, delay_release=1, wg_split="m"),
                  MgpuConfig(tile_m=128, tile_n=128, stages=4, chain_tiles=True, cluster_m=2))


def variants(op: str, m: int) -> list[tuple[str, Callable[[], Any]]]:
    """(name, zero-argument call) for the library dot, the committed config and extras."""
    k, n = SHAPES[op]
    silu, res = op == "gate_up_silu", op.endswith("_res")
    keys = jax.random.split(jax.random.key(m), 4)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16) * 0.03
    up = jax.random.normal(keys[2], (k, n), jnp.bfloat16) * 0.03
    r = jax.random.normal(keys[3], (m, n), jnp.bfloat16)
    wide = jnp.concatenate([w, up], axis=1) if silu else w
    out: list[tuple[str, Callable[[], Any]]] = []
    dot = jax.jit(lambda a, b: jnp.dot(a, b))
    out.append(("xla_dot", lambda: dot(x, wide)))
    committed = choose_config(m, n, silu, res, 132)
    for cfg in [committed] + (list(O_RES_VARIANTS) if op == "o_res" else []):
        fn = jax.jit(lambda a, b, c, u, cfg=cfg: gemm_mgpu(
            a, b, w_up=u if silu else None, residual=c if res else None, config=cfg))
        name = "committed" if cfg == committed else "variant"
        out.append((f"{name}:{json.dumps(dataclasses.asdict(cfg))}", lambda fn=fn: fn(x, w, r, up)))
    torch = torch_module()
    if torch is not None:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n * (2 if silu else 1), device="cuda", dtype=torch.bfloat16)
        out.append(("torch_cublas", lambda: a @ b))
    return out


def xla_choice(op: str, m: int) -> list[str]:
    """The lines of XLA's optimized HLO that say how it runs the dot."""
    k, n = SHAPES[op]
    n *= 2 if op == "gate_up_silu" else 1
    a, b = jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((k, n), jnp.bfloat16)
    text = jax.jit(lambda a, b: jnp.dot(a, b)).lower(a, b).compile().as_text()
    return [ln.strip()[:600] for ln in text.splitlines()
            if re.search(r"custom_call_target|__triton|block_m|tile|cublas|fusion_backend", ln)]


def _profiler(torch: Any, on: bool) -> None:
    if torch is not None:
        (torch.cuda.profiler.start if on else torch.cuda.profiler.stop)()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="op:M,... (ops: " + ",".join(SHAPES) + ")")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch = torch_module()
    order, hlo = [], {}
    calls = []
    for case in args.cases.split(","):
        op, m = case.split(":")
        hlo[case] = xla_choice(op, int(m))
        for name, call in variants(op, int(m)):
            for _ in range(3):  # compile and warm outside the profiled region
                res = call()
            (torch.cuda.synchronize() if name == "torch_cublas" else jax.block_until_ready(res))
            calls.append((case, name, call))
    _profiler(torch, True)
    for case, name, call in calls:
        res = call()
        (torch.cuda.synchronize() if name == "torch_cublas" else jax.block_until_ready(res))
        order.append({"case": case, "variant": name})
    _profiler(torch, False)
    meta = dict(run_metadata("bench.ncu_gemm"), profiled_in_order=order, xla_hlo=hlo)
    Path(args.out).write_text(json.dumps(meta, indent=1))
    print(f"profiled {len(order)} calls; metadata in {args.out}")


if __name__ == "__main__":
    main()
