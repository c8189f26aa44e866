"""GPU time per call of our GEMMs and the library's, from a kernel timeline at working clocks.

    python -m bench.timeline --out timeline.json [--cases o_res:1024,...] [--reps 20]
    python -m bench.timeline --plot kernels_gemm.json --png gemm_timeline.png

The timing core of the GEMM benchmarks (bench.kernels' GEMM rows, bench.gemm_tune --ab).
Nsight Compute times one kernel at a time at profiling clocks, and
`bench.timing.device_ms` sees only whole programs. This reads CUPTI's kernel records
(jax.profiler for JAX programs, torch.profiler for cuBLAS): each program of `reps` ordered
calls (weights rotated past L2, as in `device_ms`) runs `runs` times, 1 ms apart, in
rounds (every program once a round, so a clock drift in the trace reaches all of them
alike), and a run's calls cost its span (first kernel start to last kernel end) / reps, gaps between
kernels included, its launch excluded. `busy` counts kernel time alone. Run it under
XLA_FLAGS=--xla_gpu_enable_command_buffer= to see what XLA's CUDA graphs change.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bench import pyplot, run_metadata, torch_module
from bench.shapes import SHAPES, gemm_operands
from bench.timing import chained, cold_copies, copies_of, warm_up
from pallas_kernels.gemm_config import MgpuConfig
from pallas_kernels.gemm_mgpu import gemm_mgpu

Event = tuple[str, float, float]  # (kernel name, start us, duration us)
DEFAULT_CASES = ",".join(f"{op}:{m}" for m in (256, 512, 1024, 2048) for op in SHAPES)
RUN_PAUSE_S = 1e-3  # between runs: far longer than any gap inside one
# torch runs open with a one-element fill: its kernel (at::native::...FillFunctor...) marks
# where a run starts, so a stray kernel in the trace cannot shift every later run by one
# (which split by gaps alone gave cuBLAS rows of 1,000-1,800 TFLOP/s on an H200).
TORCH_MARKER = "FillFunctor"
# Library variants: XLA's dot (a JAX program: CUDA graphs when XLA makes them), cuBLAS
# from eager PyTorch, and the same cuBLAS calls replayed as one CUDA graph (no launch
# gaps either, so span against span compares kernels, not runtimes).
LIBRARY = ("xla_dot", "torch_cublas", "torch_cublas_graph")


def gpu_kernel_records(trace: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """Kernel records of a Chrome/Perfetto trace (jax.profiler's perfetto_trace.json or
    torch.profiler's export) as (name, stream, start us, duration us): XLA's GPU streams
    ("Stream #N" threads of a /device:GPU process; the stream is the thread id) or events
    torch files under cat "kernel". Sorted by start."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids, threads = set(), {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = str(e.get("args", {}).get("name", ""))
        if e.get("name") == "process_name" and "GPU" in name:
            gpu_pids.add(e["pid"])
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = name
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        torch_kernel = e.get("cat") == "kernel"
        xla_stream = e.get("pid") in gpu_pids and "Stream" in threads.get((e["pid"], e.get("tid")), "")
        if torch_kernel or xla_stream:
            out.append((str(e["name"]), int(e.get("tid", 0) or 0), float(e["ts"]), float(e["dur"])))
    return sorted(out, key=lambda ev: ev[2])


def gpu_kernel_events(trace: dict[str, Any]) -> list[Event]:
    """`gpu_kernel_records` without the stream."""
    return [(name, ts, dur) for name, _, ts, dur in gpu_kernel_records(trace)]


def jax_trace(run: Callable[[], Any]) -> dict[str, Any]:
    """The perfetto trace of `run()` under jax.profiler."""
    with tempfile.TemporaryDirectory() as d:
        # No Python tracer: it records every Python call, and the trace is converted on stop.
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0
        with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=opts):
            run()
        return json.load(gzip.open(next(Path(d).rglob("perfetto_trace.json.gz"))))


def split_runs(events: list[Event], runs: int) -> list[list[Event]]:
    """Kernel records of `runs` programs run RUN_PAUSE_S apart -> one list per run, cut at
    the runs - 1 widest gaps."""
    if len(events) < runs:
        raise ValueError(f"{len(events)} kernels recorded for {runs} runs: was the GPU traced?")
    gaps = [(events[i + 1][1] - (events[i][1] + events[i][2]), i) for i in range(len(events) - 1)]
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[:runs - 1])
    bounds = [0] + [i + 1 for i in cuts] + [len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:])]


def split_marked(events: list[Event], marker: str, runs: int) -> list[list[Event]]:
    """Kernel records of `runs` programs each opened by a kernel whose name holds `marker`
    -> one list per run, the markers dropped (and anything recorded before the first)."""
    starts = [i for i, e in enumerate(events) if marker in e[0]]
    if len(starts) != runs:
        raise ValueError(f"{len(starts)} '{marker}' marker kernels recorded for {runs} runs")
    bounds = starts + [len(events)]
    return [events[a + 1:b] for a, b in zip(bounds, bounds[1:])]


def in_rounds(calls: list[Callable[[], Any]], runs: int, finish: Callable[[Any], Any],
              mark: Callable[[], Any] | None = None) -> None:
    """Runs every call once a round for `runs` rounds, RUN_PAUSE_S apart (each after
    `mark()`, where given)."""
    for _ in range(runs):
        for call in calls:
            if mark is not None:
                mark()
            finish(call())
            time.sleep(RUN_PAUSE_S)


def runs_by_call(per_run: list[list[Event]], calls: int, runs: int) -> list[list[list[Event]]]:
    """The runs of `in_rounds` (round-major) -> per call, its `runs` runs."""
    if len(per_run) != calls * runs:
        raise ValueError(f"{len(per_run)} runs recorded, expected {calls} calls x {runs} rounds")
    return [per_run[i::calls] for i in range(calls)]


def run_stats(run: list[Event], calls: int) -> dict[str, Any]:
    """Per-call span and busy time (us) of one run, its kernel gaps and names."""
    span = run[-1][1] + run[-1][2] - run[0][1]
    gaps = [b[1] - (a[1] + a[2]) for a, b in zip(run, run[1:])]
    return {"span_us": span / calls, "busy_us": sum(e[2] for e in run) / calls,
            "kernels_per_call": len(run) / calls, "gap_us": statistics.median(gaps) if gaps else 0.0,
            "max_gap_us": max(gaps, default=0.0), "kernels": sorted({e[0][:80] for e in run})}


def summarize(runs: list[list[Event]], calls: int) -> dict[str, Any]:
    """Median over runs of each run's stats. Every run of one program launches the same
    kernels; runs that differ mean the trace was cut in the wrong places."""
    counts = sorted({len(r) for r in runs})
    if len(counts) > 1 or not counts[0]:
        raise ValueError(f"runs of one program recorded {counts} kernels: the trace was split wrongly")
    stats = [run_stats(r, calls) for r in runs]
    out = {k: statistics.median(s[k] for s in stats) for k in ("span_us", "busy_us", "kernels_per_call",
                                                                 "gap_us", "max_gap_us")}
    out["kernels"] = stats[0]["kernels"]
    return out


def jax_programs(op: str, m: int, reps: int,
                 configs: dict[str, MgpuConfig | None] | None = None) -> dict[str, Callable[[], Any]]:
    """Zero-argument runs of an ordered program of `reps` calls: ours (one per entry of
    `configs`, name -> launch configuration, None: the tuned choice; default
    {"ours": None}) and XLA's dot (on gate and up side by side for gate_up_silu), every
    operand but the residual rotated."""
    silu, res = op == "gate_up_silu", op.endswith("_res")
    x, w, up, r = gemm_operands(op, m)
    xs = copies_of(x, reps)
    copies = cold_copies(w.size * 2 * (2 if silu else 1))
    ws, ups = copies_of(w, copies), copies_of(up, copies)
    wides = copies_of(jnp.concatenate([w, up], axis=1), copies) if silu else ws
    progs: dict[str, Callable[[], Any]] = {}
    for name, cfg in (configs or {"ours": None}).items():
        run = chained(functools.partial(_ours, silu=silu, res=res, config=cfg), reps, rotate=(0, 1, 2), ordered=True)
        progs[name] = functools.partial(run, xs, ws, ups, r)
    dot = chained(jnp.dot, reps, rotate=(0, 1), ordered=True)
    return progs | {"xla_dot": lambda: dot(xs, wides)}


def _ours(a: jax.Array, b: jax.Array, u: jax.Array, c: jax.Array, *, silu: bool, res: bool,
          config: MgpuConfig | None) -> jax.Array:
    return gemm_mgpu(a, b, w_up=u if silu else None, residual=c if res else None, config=config)


def torch_program(torch: Any, op: str, m: int, reps: int) -> Callable[[], Any]:
    """cuBLAS through PyTorch: `reps` back-to-back matmuls, weights rotated past L2."""
    k, n = SHAPES[op]
    n *= 2 if op == "gate_up_silu" else 1
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bs = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(cold_copies(k * n * 2))]

    def run():
        for i in range(reps):
            out = a @ bs[i % len(bs)]
        return out
    return run


def torch_graph_span_us(torch: Any, run: Callable[[], Any], reps: int, runs: int) -> float:
    """Per-call time (us) of `run` (reps cuBLAS calls) captured in one CUDA graph and
    replayed, by CUDA events: the median of `runs` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # cuBLAS sets up its workspace outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    warm_up(graph.replay, lambda _: torch.cuda.synchronize(), 100.0)
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(samples)


def traced_jax(calls: list[Callable[[], Any]], runs: int) -> list[Event]:
    return gpu_kernel_events(jax_trace(lambda: in_rounds(calls, runs, jax.block_until_ready)))


def traced_torch(torch: Any, calls: list[Callable[[], Any]], runs: int) -> list[list[Event]]:
    """Per run of `in_rounds`, its kernel records (split at TORCH_MARKER kernels)."""
    flag = torch.zeros(1, device="cuda")
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        in_rounds(calls, runs, lambda _: torch.cuda.synchronize(), mark=lambda: flag.fill_(1.0))
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/t.json")
        events = gpu_kernel_events(json.loads(Path(f"{d}/t.json").read_text()))
    return split_marked(events, TORCH_MARKER, runs * len(calls))


def measure(cases: list[tuple[str, int]], reps: int, runs: int,
            configs: dict[tuple[str, int], dict[str, MgpuConfig | None]] | None = None) -> list[dict[str, Any]]:
    """Rows of (case, variant) timeline stats; `configs`: per case, our variants to time
    (see jax_programs)."""
    order, calls = [], []
    for op, m in cases:
        t0 = time.perf_counter()
        for name, call in jax_programs(op, m, reps, (configs or {}).get((op, m))).items():
            warm_up(call, jax.block_until_ready, 100.0)  # compiled, and clocks up
            order.append((f"{op}:{m}", name))
            calls.append(call)
        print(f"{op}:{m} compiled and warm in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    # Each program was warmed right after it compiled, up to minutes ago: one untraced
    # round brings the clocks back up for all of them.
    in_rounds(calls, 1, jax.block_until_ready)
    per_call = runs_by_call(split_runs(traced_jax(calls, runs), runs * len(calls)), len(calls), runs)
    for (case, name), call_runs in zip(order, per_call):
        rows.append(dict(case=case, variant=name, **summarize(call_runs, reps)))
    torch = torch_module()
    if torch is None:
        return rows
    tcalls = [torch_program(torch, op, m, reps) for op, m in cases]
    for c in tcalls:
        warm_up(c, lambda _: torch.cuda.synchronize(), 100.0)
    try:  # a second CUPTI client in one process: keep the JAX rows if it fails
        per_call = runs_by_call(traced_torch(torch, tcalls, runs), len(tcalls), runs)
        eager = [dict(case=f"{op}:{m}", variant="torch_cublas", **summarize(call_runs, reps))
                 for (op, m), call_runs in zip(cases, per_call)]
    except Exception as exc:  # noqa: BLE001
        print(f"torch.profiler failed, no eager cuBLAS rows: {exc!r}", flush=True)
        eager = []
    rows += eager
    for (op, m), call in zip(cases, tcalls):
        rows.append(dict(case=f"{op}:{m}", variant="torch_cublas_graph", busy_us=None,
                         span_us=torch_graph_span_us(torch, call, reps, runs)))
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case: library / ours for span and busy time (>= 1: ours is faster)."""
    out: dict[str, dict[str, float]] = {}
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["variant"]] = r
    for case, v in by_case.items():
        libs = {x: v[x] for x in LIBRARY if x in v}
        span_lib = min(libs, key=lambda x: libs[x]["span_us"])
        busy_lib = min(x["busy_us"] for x in libs.values() if x.get("busy_us") is not None)
        out[case] = {"ours_span_us": v["ours"]["span_us"], "ours_busy_us": v["ours"]["busy_us"],
                     "ours_gap_us": v["ours"]["gap_us"], "library": span_lib,
                     "library_span_us": libs[span_lib]["span_us"],
                     "library_busy_us": busy_lib,
                     "span_vs_library": libs[span_lib]["span_us"] / v["ours"]["span_us"],
                     "busy_vs_library": busy_lib / v["ours"]["busy_us"]}
    return out


def ratio_table(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The case -> ratios table of a bench.timeline JSON, or of a bench.kernels JSON whose
    Mosaic GEMM rows carry a timeline."""
    if "table" in res:
        return res["table"]
    return {f"{r['op']}:{r['m']}": r["mosaic"]["timeline"] for r in res.get("gemm", [])
            if "timeline" in r.get("mosaic", {})}


def plot(json_path: str, png_path: str, target: float = 0.95) -> None:
    """Bars of library / ours per GEMM shape (span and kernel time alone) against the target."""
    plt = pyplot()
    res = json.loads(Path(json_path).read_text())
    tab = ratio_table(res)
    if not tab:
        raise SystemExit(f"{json_path} has no GEMM timeline table (bench.timeline or bench.kernels output)")
    cases = sorted(tab, key=lambda c: (int(c.split(":")[1]), c))
    xs = range(len(cases))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(cases)), 4.5))
    ax.bar([x - 0.2 for x in xs], [tab[c]["span_vs_library"] for c in cases], 0.4, label="GPU time per call (span)")
    ax.bar([x + 0.2 for x in xs], [tab[c]["busy_vs_library"] for c in cases], 0.4, label="kernel time alone (busy)")
    ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target}")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xticks(list(xs), cases, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0.7, 1.15)
    ax.set_ylabel("library / ours (>= 1: ours faster)")
    ax.set_title(f"Mosaic GEMMs vs the faster of XLA's dot and cuBLAS ({res['meta'].get('jax_device', '?')})")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", metavar="JSON", help="only draw JSON's ratios (timeline or bench.kernels) to --png")
    p.add_argument("--png", default="gemm_timeline.png")
    p.add_argument("--cases", default=DEFAULT_CASES, help="op:M,... (ops: " + ",".join(SHAPES) + ")")
    p.add_argument("--reps", type=int, default=20, help="calls per program")
    p.add_argument("--runs", type=int, default=5, help="rounds: runs of each program (median)")
    p.add_argument("--out", help="results JSON (required unless --plot)")
    a = p.parse_args(argv)
    if a.plot:
        plot(a.plot, a.png)
        return
    if not a.out:
        p.error("--out is required")
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
    rows = measure(cases, a.reps, a.runs)
    tab = table(rows)
    for case, t in tab.items():
        print(f"{case:>18}  ours {t['ours_span_us']:7.1f} us/call (gap {t['ours_gap_us']:.1f})  "
              f"library/ours span {t['span_vs_library']:.3f} busy {t['busy_vs_library']:.3f}", flush=True)
    meta = dict(run_metadata("bench.timeline"), xla_flags=os.environ.get("XLA_FLAGS", ""), reps=a.reps, runs=a.runs)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows, table=tab), indent=1))


if __name__ == "__main__":
    main()
