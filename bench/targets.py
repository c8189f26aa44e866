"""The kernel targets checked against `bench.kernels` results: pass or fail, and by how much.

    python -m bench.targets bench/results/kernels_gemm_s14m_h200.json bench/results/kernels_memory_s14m_h200.json
    python -m bench.targets --run gemm_a.json,memory_a.json --run gemm_b.json,memory_b.json ...

Several result files may be given (one run's GEMM section, another's memory sections);
for each target the last file that measured it counts. With several `--run`s (each a
comma-separated list of one run's files, e.g. runs on different machines) each run is
judged alone, and then the median of each ratio over the runs that measured it: a
shape's typical speed, where a single run moves it by a few percent between machines. Targets on one H100/H200:
- GEMM at full grid >= GEMM_TARGET of the faster of XLA's dot and cuBLAS on each shape,
  by GPU time per call from CUPTI records (`mosaic.timeline`, bench.timeline) where the
  run has them, else by `device_ms` slope timing (`mosaic.vs_library`);
- paged decode attention >= DECODE_TARGET of the copy bandwidth at contexts >= LONG_CONTEXT;
- RMSNorm (+ residual) and RoPE >= MEMORY_TARGET of it at the largest T the run measured
  (below ~64 MB a copy of the same bytes is launch-bound too: bench.kernels'
  `vs_copy_same_size`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

GEMM_TARGET = 0.95
DECODE_TARGET = 0.80
MEMORY_TARGET = 0.70
LONG_CONTEXT = 2048
MEMORY_OPS = ("rms_norm_res", "rope")


def _verdict(target: float, measure: str, ratios: dict[str, float]) -> dict[str, Any]:
    failing = sorted(k for k, v in ratios.items() if not v >= target)
    return {"target": target, "measure": measure, "ratios": ratios, "passed": len(ratios) - len(failing),
            "of": len(ratios), "failing": failing, "pass": bool(ratios) and not failing}


def gemm(res: dict[str, Any]) -> dict[str, Any] | None:
    rows = [r for r in res.get("gemm", []) if "mosaic" in r]
    if not rows:
        return None
    timed = all("timeline" in r["mosaic"] for r in rows)
    ratios = {f"{r['op']}:{r['m']}": (r["mosaic"]["timeline"]["span_vs_library"] if timed
                                      else r["mosaic"]["vs_library"]) for r in rows}
    return _verdict(GEMM_TARGET, "timeline span per call" if timed else "slope timing", ratios)


def decode(res: dict[str, Any]) -> dict[str, Any] | None:
    rows = [r for r in res.get("decode_attention", []) if r["ctx"] >= LONG_CONTEXT]
    if not rows:
        return None
    return _verdict(DECODE_TARGET, "vs copy bandwidth", {f"{r['n']}x{r['ctx']}": r["vs_copy"] for r in rows})


def memory(res: dict[str, Any]) -> dict[str, Any] | None:
    rows = [r for r in res.get("memory_bound", []) if r["op"] in MEMORY_OPS]
    if not rows:
        return None
    t = max(r["t"] for r in rows)
    return _verdict(MEMORY_TARGET, f"vs copy bandwidth at T = {t}",
                    {f"{r['op']}:{r['t']}": r["vs_copy"] for r in rows if r["t"] == t})


def check(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Target name -> verdict, from the last of `results` that measured it."""
    out: dict[str, dict[str, Any]] = {}
    for res in results:
        for name, fn in (("gemm", gemm), ("decode_attention", decode), ("rmsnorm_rope", memory)):
            if (v := fn(res)) is not None:
                out[name] = v
    return out


def median_check(runs: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Target name -> verdict on the median over `runs` (each a list of result dicts, as
    for `check`) of every ratio; the measure names how many runs measured it."""
    per_run = [check(r) for r in runs]
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(n for v in per_run for n in v):
        seen = [v[name] for v in per_run if name in v]
        keys = dict.fromkeys(k for v in seen for k in v["ratios"])
        ratios = {k: statistics.median(v["ratios"][k] for v in seen if k in v["ratios"]) for k in keys}
        out[name] = _verdict(seen[0]["target"], f"median of {len(seen)} runs, {seen[0]['measure']}", ratios)
    return out


def report(verdicts: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, v in verdicts.items():
        worst = min(v["ratios"].items(), key=lambda kv: kv[1])
        lines.append(f"[target] {name}: {'PASS' if v['pass'] else 'FAIL'} {v['passed']}/{v['of']} >= {v['target']} "
                     f"({v['measure']}; worst {worst[0]} {worst[1]:.3f}"
                     + (f"; failing {', '.join(v['failing'])})" if v["failing"] else ")"))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="bench.kernels result JSONs of one run")
    p.add_argument("--run", action="append", default=[], metavar="A.json,B.json",
                   help="one run's result JSONs, comma-separated; repeat for several runs")
    a = p.parse_args(argv)
    groups = [r.split(",") for r in a.run] + ([a.results] if a.results else [])
    if not groups:
        p.error("give result JSONs, or --run A.json,B.json (repeatable)")
    runs = [[json.loads(Path(f).read_text()) for f in files] for files in groups]
    for files, res in zip(groups, runs):
        if len(runs) > 1:
            print(f"run {','.join(files)}:")
        for line in report(check(res)):
            print(line)
    if len(runs) > 1:
        print(f"median of {len(runs)} runs:")
        for line in report(median_check(runs)):
            print(line)


if __name__ == "__main__":
    main()
