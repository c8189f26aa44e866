"""Iteration time of one mixed dense batch in each pipeline mode (same kernels, same batch).

    python -m bench.pipelines --model llama-3-8b --out bench/results/pipelines_h200.json \
        [--decodes 255 --context 1280 --tokens 2048] [--pipelines sequential,nanobatch,nanoflow]

The batch is `decodes` decode rows at `context` cached tokens each plus one prefill chunk
filling the rest of `tokens` (the engine's mixed iteration), over random bf16 weights and a
random KV cache. Each mode's step is jitted with the cache donated, as the engine runs it,
and timed as the median of `iters` back-to-back calls. Reported against NanoFlow's optimal
iteration (2 x params x tokens at the datasheet bf16 peak) and with the share of attention
kernel time that ran beside another stream's kernels (from a `jax.profiler` trace).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import pyplot, run_metadata
from bench.overlap import Event, overlap_stats, trace_events
from nanoflow_jax.config import PIPELINES, ModelConfig
from nanoflow_jax.autosearch import compile_step, mixed_batch, parse_programs, time_step
from nanoflow_jax.models.ops import programs_key
from nanoflow_jax.models.paged import BatchInputs, KVCache
from nanoflow_jax.models.params import fuse_qkv, init_params


def kernel_breakdown(events: list[Event], top: int = 12) -> dict[str, float]:
    """GPU time (us) by kernel name over one iteration, the largest `top` names and the rest."""
    by_name: dict[str, float] = {}
    for name, _, _, dur in events:
        by_name[name] = by_name.get(name, 0.0) + dur
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
    out = {name: round(us, 1) for name, us in ranked[:top]}
    if len(ranked) > top:
        out["(other kernels)"] = round(sum(us for _, us in ranked[top:]), 1)
    return out


def plot_timelines(timelines: dict[str, list[Event]], png: str, window_us: float = 6000.0) -> None:
    """The first `window_us` of each mode's iteration, one lane per stream, attention in red."""
    plt = pyplot()
    fig, axes = plt.subplots(len(timelines), 1, figsize=(14, 1.6 * len(timelines) + 0.6), squeeze=False)
    for ax, (label, events) in zip(axes[:, 0], timelines.items()):
        t0 = min(e[2] for e in events) if events else 0.0
        lanes = {s: i for i, s in enumerate(sorted({e[1] for e in events}))}
        for name, stream, start, dur in events:
            if start - t0 > window_us:
                continue
            # The Mosaic GEMMs trace as "anonymous_mosaic_gpu_kernel", the library's as "nvjet"/"gemm".
            gemm = any(tag in name for tag in ("mosaic", "mpmd", "gemm", "nvjet"))
            color = "tab:red" if "attention" in name else "tab:blue" if gemm else "0.6"
            ax.broken_barh([(start - t0, dur)], (lanes[stream] - 0.4, 0.8), color=color)
        ax.set_yticks(range(len(lanes)), [f"stream {i}" for i in range(len(lanes))])
        ax.set_xlim(0, window_us)
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("us from the iteration's first kernel (red: attention, blue: GEMM, grey: other)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def time_mode(params: Any, cache: KVCache, batch: BatchInputs, cfg: ModelConfig, kernels: str, pipeline: str,
              iters: int, trace: bool, programs: str = "") -> tuple[dict[str, Any], KVCache]:
    nano = tuple(programs_key(p) for p in parse_programs(programs)) if programs else ((), ())
    t0 = time.perf_counter()
    compiled = compile_step(params, cache, batch, cfg, kernels, pipeline, nano)
    row: dict[str, Any] = {"pipeline": pipeline, "programs": programs or "whole GPU",
                           "compile_s": round(time.perf_counter() - t0, 1)}
    ms, cache = time_step(compiled, params, cache, batch, iters)
    row["iteration_ms"] = round(ms, 3)
    if trace and jax.default_backend() == "gpu":
        box = [cache]

        def once():
            logits, box[0] = compiled(params, box[0], batch)
            return logits
        events = trace_events(lambda: once(), ())
        row.update(overlap_stats(events))
        row["kernel_us"] = kernel_breakdown(events)
        row["_events"] = events
        cache = box[0]
    return row, cache


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pipelines", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--decodes", type=int, default=255)
    p.add_argument("--context", type=int, default=1280)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rows", type=int, default=256, help="the S bucket (max_num_seqs)")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--programs", action="append", default=[],
                   help="also run nanoflow with these SM budgets: A's|B's, e.g. 'gemm=32,decode_attention=66|gemm=100' "
                        "(repeatable)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="a PNG of each mode's kernel timeline (GPU traces)")
    a = p.parse_args()
    cfg = ModelConfig.from_name(a.model)
    params = fuse_qkv(init_params(cfg, jax.random.key(0), a.dtype))
    batch, pages = mixed_batch(cfg, a.decodes, a.context, a.tokens, a.rows, page=16)
    shape = (cfg.num_layers, pages, 16, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(k=jnp.zeros(shape, a.dtype), v=jnp.zeros(shape, a.dtype))  # values do not change the time
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    rows = []
    runs = [(pipeline, "") for pipeline in a.pipelines.split(",")] + [("nanoflow", spec) for spec in a.programs]
    for pipeline, spec in runs:
        row, cache = time_mode(params, cache, batch, cfg, a.kernels, pipeline, a.iters, not a.no_trace, spec)
        # NanoFlow's optimal: every token costs 2 x params FLOPs at the datasheet peak (989 TFLOP/s).
        row["optimal_ms"] = round(2 * n_params * a.tokens / 989.4e12 * 1e3, 3)
        row["of_optimal"] = round(row["optimal_ms"] / row["iteration_ms"], 3)
        print(json.dumps({k: v for k, v in row.items() if k != "_events"}), flush=True)
        rows.append(row)
    timelines = {f'{r["pipeline"]} ({r["programs"]}): {r["iteration_ms"]} ms': r.pop("_events") for r in rows
                 if "_events" in r}
    if a.plot and timelines:
        plot_timelines(timelines, a.plot)
    base = next((r["iteration_ms"] for r in rows if r["pipeline"] == "sequential"), None)
    for r in rows:
        if base:
            r["speedup_vs_sequential"] = round(base / r["iteration_ms"], 3)
    result = {**run_metadata("bench.pipelines"), "model": a.model, "params": n_params,
              "batch": {"decodes": a.decodes, "context": a.context, "tokens": a.tokens, "rows": a.rows},
              "rows": rows}
    print(json.dumps([(r["pipeline"], r["programs"], r.get("speedup_vs_sequential")) for r in rows]))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
