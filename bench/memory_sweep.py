"""RMSNorm (+ residual) and RoPE launch configurations against size-matched copy ceilings.

    python -m bench.memory_sweep --out bench/results/memory_sweep.json [--smoke]

Llama-3-8B sizes (E=4096, 32 query / 8 KV heads of 128, bf16) at T in TOKENS. Each
kernel is timed with bench.timing.device_ms (many calls in one jit program) and
compared with a copy of the same number of bytes timed the same way, and with the
large-buffer copy ceiling. --smoke: tiny shapes, interpreted on CPU, a few configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels as pk
from bench import copy_bandwidth, rel_err, run_metadata
from bench.timing import device_ms, timed_program, timing_mode
from pallas_kernels import reference as ref
from pallas_kernels._common import num_sms
from pallas_kernels.norm_rope import default_block_rows, rope_blocks, rope_defaults

FULL = dict(tokens=(256, 512, 1024, 2048), e=4096, hq=32, hk=8, d=128, reps=10, repeats=3)
SMOKE = dict(tokens=(13,), e=128, hq=4, hk=2, d=32, reps=2, repeats=1)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
BF16 = jnp.bfloat16


def rms_configs() -> list[dict]:
    """Default, the old kernel (2 rows, 8 warps, 1024-column chunks), then rows x warps.

    Dropped: 1 row on 16 warps (8 values a thread) and 16 rows on 4 warps (over registers).
    """
    grid = [dict(block_rows=br, num_warps=nw) for br, nw in itertools.product((1, 2, 4, 8, 16), (4, 8, 16))
            if (br, nw) not in ((1, 16), (16, 4))]
    return [{}, dict(block_rows=2, num_warps=8, block_cols=1024)] + grid


def rope_configs() -> list[dict]:
    """Default, the old kernel (one head a step, no head splits), then tokens x heads a step.

    Kept: 32 to 128 token-heads a step (fewer cannot fill the memory pipe, more spill);
    8 warps only for the biggest steps.
    """
    grid = [dict(block_tokens=bt, heads_per_step=h, num_warps=nw)
            for bt, h, nw in itertools.product((8, 16, 32), (2, 4, 8), (4, 8))
            if 32 <= bt * h <= 128 and (nw == 4 or bt * h == 128)]
    # Bigger steps on 8 warps (same values a thread as 128 on 4): for T in the thousands,
    # where every program has many items and bytes in flight are what is left to win.
    big = [dict(block_tokens=bt, heads_per_step=h, num_warps=8) for bt, h in ((32, 8), (64, 4), (64, 2))]
    return [{}, dict(num_warps=8), dict(heads_per_step=1, head_splits=1)] + grid + big


def copy_step(a: jax.Array) -> jax.Array:
    # The barrier keeps XLA from fusing the chain's adds into one pass (on GPU it is
    # only removed after fusion; the CPU compiler drops it first, see chain_kernels).
    return lax.optimization_barrier(a + jnp.ones((), a.dtype))


def chain_kernels(n: int, reps: int) -> int:
    """Kernels in the compiled copy chain that add over all n elements (want: reps).

    The program is the one device_ms times (its timing mode). A kernel is a fusion
    calling a computation with a full-size add whose root is not a one-element dependency
    patch (a dynamic-update-slice, computing only the element it needs); counted wherever
    called (GPU command buffers wrap fusions). Plus unfused adds.
    """
    mode = "patched" if timing_mode() == "patched" else "ordered"
    run, args = timed_program(copy_step, (jnp.zeros((n,), BF16),), reps, mode=mode)
    hlo = run.lower(*args).compile().as_text()
    full_add = re.compile(rf"\[{n}\]\{{[^}}]*\}} add\(")
    comps = re.split(r"\n(?=\S)", hlo)  # computations start at column 0
    adders = {c.split()[0].lstrip("%") for c in comps
              if full_add.search(c) and "dynamic-update-slice(" not in c[c.find("ROOT"):].split("\n")[0]}
    fused = sum(m.group(1) in adders for m in re.finditer(r"calls=%?([\w.\-]+)", hlo))
    entry = next(c for c in comps if c.startswith("ENTRY"))
    return fused + len(full_add.findall(entry))


def copy_ceiling(nbytes: int, cfg: dict) -> dict[str, Any]:
    """Time of an `a + 1` chain moving nbytes (half read, half written), like the kernels."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(0), (n,), BF16)
    ms = device_ms(copy_step, x, reps=cfg["reps"], repeats=cfg["repeats"])
    k = chain_kernels(n, cfg["reps"])
    return {"bytes": 4 * n, "ms": ms, "gbps": 4 * n / ms / 1e6, "chain_kernels": k, "reps": cfg["reps"],
            "one_kernel_per_step": k == cfg["reps"]}


def cases(cfg: dict, key: jax.Array) -> dict[tuple[str, int], tuple]:
    """(kernel, T) -> (fn(config) -> callable, inputs, reference output, bytes moved)."""
    e, d, interp = cfg["e"], cfg["d"], cfg["interpret"]
    out = {}
    for t in cfg["tokens"]:
        k = jax.random.split(jax.random.fold_in(key, t), 4)
        x, r = (jax.random.normal(kk, (t, e), BF16) for kk in k[:2])
        w = jax.random.normal(k[2], (e,), BF16)
        rms = lambda c: lambda x, r, w: pk.rms_norm(x, w, eps=1e-5, residual=r, interpret=interp, **c)  # noqa: E731
        want = jax.jit(lambda x, r, w: ref.rms_norm(x, w, eps=1e-5, residual=r))(x, r, w)
        out["rms_norm_res", t] = (rms, (x, r, w), want, (4 * t * e + e) * 2)
        pos = jax.random.randint(k[3], (t,), 0, 16384, jnp.int32)
        rope = lambda c: lambda q, p: pk.apply_rope(q, p, theta=5e5, scaling=LLAMA3, interpret=interp, **c)  # noqa: E731
        for name, h in (("rope_q", cfg["hq"]), ("rope_k", cfg["hk"])):
            q = jax.random.normal(jax.random.fold_in(k[3], h), (t, h, d), BF16)
            want = jax.jit(lambda q, p: ref.apply_rope(q, p, theta=5e5, scaling=LLAMA3))(q, pos)
            out[name, t] = (rope, (q, pos), want, 4 * t * h * d + 4 * t)
    return out


def resolved(kernel: str, t: int, c: dict, cfg: dict) -> dict:
    """The block sizes a config launches with (what `None` became)."""
    if kernel == "rms_norm_res":
        br = c.get("block_rows") or default_block_rows(t, cfg["e"], 2, True, num_sms())
        return {"block_rows": br}
    h = cfg["hq"] if kernel == "rope_q" else cfg["hk"]
    d_bt, d_hps, _ = rope_defaults(t, num_sms())
    bt, hps, splits = rope_blocks(t, h, cfg["d"], num_sms(), c.get("block_tokens", d_bt),
                                  c.get("heads_per_step", d_hps), c.get("head_splits"))
    return {"block_tokens": bt, "heads_per_step": hps, "head_splits": splits}


def error_of(fn: Callable, inputs: tuple, want: Any) -> float:
    got = jax.jit(fn)(*inputs)
    return max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def measure(kernel: str, t: int, c: dict, case: tuple, ceilings: dict, cfg: dict, checked: dict) -> dict:
    """One row: time, bandwidth, ratios to both ceilings; output checked once per config."""
    make, inputs, want, nbytes = case
    row: dict[str, Any] = {"kernel": kernel, "T": t, "config": c, "resolved": resolved(kernel, t, c, cfg)}
    fn = make(c)
    try:
        ckey = json.dumps([kernel, c], sort_keys=True)
        if ckey not in checked:
            checked[ckey] = row["rel_err"] = error_of(fn, inputs, want)
        ms = device_ms(fn, *inputs, reps=cfg["reps"], repeats=cfg["repeats"])
    except Exception as e:  # noqa: BLE001 (a config that does not compile is a result too)
        return row | {"error": str(e)[:300]}
    gbps = nbytes / ms / 1e6
    same = ceilings["same_size"][f"{kernel}/{t}"]["gbps"]
    return row | {"ms": ms, "bytes": nbytes, "gbps": gbps, "vs_copy_same_size": gbps / same,
                  "vs_copy_large": gbps / ceilings["large"]["copy_gbps"], "ok": checked[ckey] < 1e-2}


def best_rows(rows: list[dict]) -> list[dict]:
    """Fastest verified row per (kernel, T)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["kernel"], r["T"])
        if r.get("ok") and (k not in best or r["gbps"] > best[k]["gbps"]):
            best[k] = r
    return [best[k] for k in sorted(best)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="memory_sweep.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, 2 configs a kernel")
    ap.add_argument("--tokens", help="comma-separated T (default: 256,512,1024,2048; smoke: 13)")
    ap.add_argument("--kernels", default="rms_norm_res,rope_q,rope_k", help="comma-separated subset to sweep")
    args = ap.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL, interpret=args.smoke)
    if args.tokens:
        cfg["tokens"] = tuple(int(t) for t in args.tokens.split(","))
    seed = time.time_ns() % (2**31)
    res: dict[str, Any] = {"meta": run_metadata("bench.memory_sweep") | {"seed": seed, "smoke": args.smoke},
                           "ceilings": {"large": copy_bandwidth(1 << 22 if args.smoke else 2 << 30), "same_size": {}},
                           "rows": [], "best": []}
    keep = set(args.kernels.split(","))
    all_cases = {k: v for k, v in cases(cfg, jax.random.key(seed)).items() if k[0] in keep}
    for (kernel, t), case in all_cases.items():
        res["ceilings"]["same_size"][f"{kernel}/{t}"] = copy_ceiling(case[3], cfg)
    checked: dict[str, float] = {}
    for (kernel, t), case in sorted(all_cases.items(), key=lambda kv: -kv[0][1]):  # largest T first
        configs = rms_configs() if kernel == "rms_norm_res" else rope_configs()
        for c in configs[:2] if args.smoke else configs:
            row = measure(kernel, t, c, case, res["ceilings"], cfg, checked)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    res["best"] = best_rows(res["rows"])
    if not all(c["one_kernel_per_step"] for c in res["ceilings"]["same_size"].values()):
        print("warning: a copy chain was fused (chain_kernels < reps): same-size ceilings overstated")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{'kernel':14} {'T':>5} {'us':>8} {'GB/s':>7} {'vs same':>7} {'vs large':>8}  config")
    for r in res["best"]:
        print(f"{r['kernel']:14} {r['T']:5d} {r['ms'] * 1e3:8.1f} {r['gbps']:7.0f} {r['vs_copy_same_size']:7.2f} "
              f"{r['vs_copy_large']:8.2f}  {r['config']} -> {r['resolved']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
