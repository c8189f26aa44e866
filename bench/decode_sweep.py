"""Decode-attention launch configurations, against the device copy ceiling.

    python -m bench.decode_sweep --out bench/results/decode_sweep.json [--cases 64x4096,128x640]
    python -m bench.decode_sweep --plot bench/results/decode_sweep_s11_h200.json --png sweep.png

Cases are requests x context: long contexts (the kernel target) and the engine
benchmark's decode steps (128 requests at 512-768 cached tokens).

Picks the block size, warps, pipeline stages and context splits for
`pallas_kernels.paged_decode_attention` by measurement (Llama-3-8B heads: 32 query,
8 KV, head dim 128; shuffled 16-token pages).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from bench import copy_bandwidth, pyplot, run_metadata
from bench.timing import device_ms

H, K, D, PS = 32, 8, 128, 16
# (block_k, warps, stages, splits, programs per SM). The first sweep (decode_sweep_h200.json)
# covered 64/128-key blocks x 4/8 warps x 2/3 stages x splits auto/4; the second
# (decode_sweep2_h200.json) longer blocks and deeper pipelines: 256 keys, 4 warps, 3
# stages won at long contexts. The later rows launch several programs per SM, for short
# contexts where one program per SM waits on memory latency: 64-key blocks at 4 per SM won
# the third (decode_sweep_s11_h200.json, 0.71 of copy at 128 x 640, 0.91 at 64 x 4096; its
# mask_tail=False rows, the ragged last block loaded whole, lost everywhere: 0.47-0.68).
# The last rows probe around that winner.
CONFIGS = [(128, 4, 3, None, 1), (128, 4, 4, None, 1), (128, 8, 4, None, 1), (256, 4, 2, None, 1),
           (256, 4, 3, None, 1), (256, 8, 2, None, 1), (256, 8, 3, None, 1), (256, 8, 4, None, 1),
           (128, 4, 3, 2, 1), (256, 8, 3, 2, 1), (512, 8, 2, None, 1), (512, 16, 2, None, 1),
           (256, 4, 3, None, 2), (256, 4, 2, None, 4), (128, 4, 3, None, 2), (128, 4, 2, None, 4),
           (64, 4, 2, None, 4), (64, 4, 3, None, 4), (64, 4, 2, None, 8), (64, 8, 2, None, 4),
           (32, 4, 2, None, 8)]


def case(n: int, ctx: int, rng: np.random.Generator) -> tuple:
    w = -(-ctx // PS)
    pages = n * w + 1
    k = jax.random.normal(jax.random.key(1), (pages, PS, K, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (pages, PS, K, D), jnp.bfloat16)
    bt = jnp.asarray(rng.permutation(np.arange(1, pages)).reshape(n, w), jnp.int32)
    q = jax.random.normal(jax.random.key(3), (n, H, D), jnp.bfloat16)
    return q, k, v, bt, jnp.full((n,), ctx, jnp.int32)


def sweep_configs(inputs: tuple, nbytes: int, copy_gbps: float, scale: float,
                  timer: Callable[..., float]) -> list[dict[str, Any]]:
    """Times paged_decode_attention on `inputs` (q, k, v, block_table, context_len) under
    each of CONFIGS with `timer(fn, *inputs)` (ms); a config that fails is a row too."""
    rows: list[dict[str, Any]] = []
    for bk, nw, ns, splits, pps in CONFIGS:
        row: dict[str, Any] = {"block_k": bk, "num_warps": nw, "num_stages": ns, "num_splits": splits,
                               "programs_per_sm": pps}
        fn = lambda q, k, v, bt, c: pk.paged_decode_attention(  # noqa: E731
            q, k, v, bt, c, scale=scale, block_k=bk, num_warps=nw, num_stages=ns, num_splits=splits,
            programs_per_sm=pps)
        try:
            ms = timer(fn, *inputs)
        except Exception as e:  # noqa: BLE001 (a config that does not compile is a result too)
            rows.append({**row, "error": str(e)[:300]})
            continue
        rows.append({**row, "ms": ms, "gbps": nbytes / ms / 1e6, "vs_copy": nbytes / ms / 1e6 / copy_gbps})
        print(rows[-1], flush=True)
    return rows


def config_label(row: dict[str, Any]) -> str:
    """e.g. "64 keys, 4 warps, 2 stages, 4/SM" (+ ", 2 splits"; + ", whole tail" for the
    session-11 rows that loaded the ragged last block unmasked)."""
    label = f"{row['block_k']} keys, {row['num_warps']} warps, {row['num_stages']} stages, {row.get('programs_per_sm', 1)}/SM"
    if row.get("num_splits"):
        label += f", {row['num_splits']} splits"
    return label + (", whole tail" if row.get("mask_tail") is False else "")


def plot(json_path: str, png_path: str) -> None:
    """One panel per case: each configuration's fraction of copy bandwidth, best on top."""
    plt = pyplot()
    res = json.loads(Path(json_path).read_text())
    ok = [r for r in res["rows"] if "vs_copy" in r]
    cases = sorted({(r["n"], r["ctx"]) for r in ok})
    if not cases:
        raise SystemExit(f"{json_path} has no timed decode-sweep rows")
    height = 0.22 * max(sum(1 for r in ok if (r["n"], r["ctx"]) == c) for c in cases) + 1.2
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), height), squeeze=False)
    for ax, (n, ctx) in zip(axes[0], cases):
        rows = sorted((r for r in ok if (r["n"], r["ctx"]) == (n, ctx)), key=lambda r: r["vs_copy"])
        ax.barh(range(len(rows)), [r["vs_copy"] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), [config_label(r) for r in rows], fontsize=7)
        ax.axvline(0.8, color="k", ls=":", lw=1, label="target 0.8 (long contexts)")
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of device copy bandwidth")
        ax.set_title(f"{n} requests x {ctx} tokens", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Paged decode attention launch configurations ({res['meta'].get('jax_device', '?')})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="decode_sweep.json")
    ap.add_argument("--cases", default="64x4096,256x2048,128x640", help="requests x context, comma-separated")
    ap.add_argument("--plot", metavar="JSON", help="only draw JSON's rows to --png")
    ap.add_argument("--png", default="decode_sweep.png")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png)
        return
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    rng = np.random.default_rng()
    res = {"meta": run_metadata("bench.decode_sweep"), "ceilings": copy_bandwidth(), "rows": []}
    copy = res["ceilings"]["copy_gbps"]
    timer = lambda fn, *a: device_ms(fn, *a, reps=10, repeats=3)  # noqa: E731
    for n, ctx in cases:
        rows = sweep_configs(case(n, ctx, rng), 2 * n * ctx * K * D * 2, copy, D ** -0.5, timer)
        res["rows"] += [{"n": n, "ctx": ctx, **r} for r in rows]
        Path(args.out).write_text(json.dumps(res, indent=1))
    ok = [r for r in res["rows"] if "ms" in r]
    for n, ctx in cases:
        best = max((r for r in ok if (r["n"], r["ctx"]) == (n, ctx)), key=lambda r: r["vs_copy"], default=None)
        print("best", best)


if __name__ == "__main__":
    main()
