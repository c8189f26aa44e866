"""Nsight Compute CSV (`ncu --csv --page details`) -> one compact JSON row per kernel.

    python -m bench.ncu_summary ncu.csv --order ncu_meta.json --out summary.json

--order: the JSON `bench.ncu_gemm` / `bench.chain_probe` wrote (its `profiled_in_order`),
or a JSON list of labels, one per profiled call; each kernel row gets its call's label.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

# Metric name in the CSV -> key in the summary.
METRICS = {
    "Duration": "duration_ns", "gpu__time_duration.sum": "duration_ns",
    "SM Frequency": "sm_hz", "Compute (SM) Throughput": "sm_throughput_pct",
    "L2 Cache Throughput": "l2_throughput_pct", "DRAM Throughput": "dram_throughput_pct",
    "L1/TEX Cache Throughput": "l1_throughput_pct", "L2 Hit Rate": "l2_hit_pct",
    "Registers Per Thread": "registers", "Dynamic Shared Memory Per Block": "dynamic_smem_bytes",
    "Cluster Size": "cluster_size", "Warp Cycles Per Issued Instruction": "warp_cycles_per_issue",
    "Issue Slots Busy": "issue_slots_busy_pct",
}
RULE_WORDS = ("pipeline", "bank conflict", "stalled")  # rule texts worth keeping


_TIME_UNITS = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}


def _number(text: str, unit: str = "") -> float | str:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return text
    return value * _TIME_UNITS.get(unit, 1.0)  # durations in ns whatever unit ncu printed


def summarize(csv_text: str, labels: list[Any] | None = None) -> list[dict[str, Any]]:
    """One dict per profiled kernel, in profiling order."""
    lines = [ln for ln in csv_text.splitlines() if ln.startswith('"')]
    rows = list(csv.DictReader(lines))
    kernels: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"], "grid": r["Grid Size"],
                                         "block": r["Block Size"], "rules": []})
        key = METRICS.get(r.get("Metric Name") or "")
        if key:
            k[key] = _number(r["Metric Value"], (r.get("Metric Unit") or "") if key == "duration_ns" else "")
        text = r.get("Rule Description") or ""
        if any(w in text for w in RULE_WORDS):
            k["rules"].append(text[:300])
    out = list(kernels.values())
    if labels:
        for k, label in zip(out, labels):
            k["call"] = label
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--order", help="JSON with profiled_in_order, or a JSON list of labels")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    labels = None
    if a.order:
        order = json.loads(Path(a.order).read_text())
        labels = order["profiled_in_order"] if isinstance(order, dict) else order
    rows = summarize(Path(a.csv).read_text(), labels)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} kernels -> {a.out}")


if __name__ == "__main__":
    main()
