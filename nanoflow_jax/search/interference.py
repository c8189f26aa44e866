"""Interference of overlapped operations: how much slower two kernels run side by side.

Two kernels on two GPU streams, each on its own SMs (its `num_programs`), still share the
memory system, the L2 and the launch machinery, so each runs slower than alone at the
same budget. The model: an op co-running with another is slowed by a factor that
depends on the two ops' kinds (compute- or memory-bound) and on the memory-bound op's
share of their programs, f = memory programs / (memory + compute programs);
piecewise-linear in f between measured points, constant beyond the outermost.

How a factor is read from a measurement: back to back, a compute op and a memory op
take g + a; perfectly overlapped with no interference they would take
`ideal_fraction` of that (max(g, a) / (g + a) for one pair; 1/2 for two nano-batch
chains that alternate the two ops, bench.overlap's "streams2"). The factor is
(overlapped / back to back) / ideal_fraction. Both ops of a pair get that factor: the
measurement does not separate them.

`DEFAULT` is seeded from measurements on one H200 (jax 0.11.2), each point citing its
source; `measure_interference` re-measures it on the GPU at hand with bench.overlap's
machinery (a Mosaic GEMM 1024 x 4096 -> 28,672 beside decode attention for 256 requests x
1,280 keys, in the engine's two-scheduling-group stream regions).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

FORMAT = "nanoflow_jax.search.interference/1"
KINDS = ("compute", "memory")


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured split: the memory op's share f and the slow-down factor read from it."""

    memory_share: float
    factor: float
    source: str = ""


def pair_factor(overlapped_ms: float, back_to_back_ms: float, ideal_fraction: float) -> float:
    """The slow-down factor a measurement implies (see the module docstring)."""
    if not (overlapped_ms > 0 and back_to_back_ms > 0 and 0 < ideal_fraction <= 1):
        raise ValueError("times must be > 0 and ideal_fraction in (0, 1]")
    return (overlapped_ms / back_to_back_ms) / ideal_fraction


@dataclasses.dataclass(frozen=True)
class Interference:
    """Slow-down factors by pair of kinds: {("compute", "memory"): [points], ...}.

    A pair with no points has factor `unmeasured` (stated in `notes`)."""

    points: Mapping[tuple[str, str], tuple[Point, ...]]
    unmeasured: float = 1.0
    notes: str = ""

    def __post_init__(self) -> None:
        for (a, b), pts in self.points.items():
            if a not in KINDS or b not in KINDS:
                raise ValueError(f"kinds are {KINDS}, got {(a, b)}")
            shares = [p.memory_share for p in pts]
            if shares != sorted(set(shares)) or not all(0 <= s <= 1 for s in shares):
                raise ValueError(f"{a}/{b}: memory shares must be strictly increasing in [0, 1], got {shares}")
            if any(p.factor < 1.0 for p in pts):
                raise ValueError(f"{a}/{b}: a slow-down factor below 1 would make sharing faster than owning "
                                 f"the SMs alone; got {[p.factor for p in pts]}")
        if self.unmeasured < 1.0:
            raise ValueError("the unmeasured factor must be >= 1")

    def factor(self, kind: str, programs: float, other_kind: str, other_programs: float) -> float:
        """Slow-down of an op of `kind` on `programs` while one of `other_kind` runs on `other_programs`."""
        pts = self.points.get((kind, other_kind)) or self.points.get((other_kind, kind))
        if not pts:
            return self.unmeasured
        if kind == other_kind:
            f = 0.5
        else:
            mem = programs if kind == "memory" else other_programs
            f = mem / max(programs + other_programs, 1e-9)
        xs = [p.memory_share for p in pts]
        if f <= xs[0]:
            return pts[0].factor
        if f >= xs[-1]:
            return pts[-1].factor
        i = bisect.bisect_right(xs, f) - 1
        a, b = pts[i], pts[i + 1]
        return a.factor + (b.factor - a.factor) * (f - a.memory_share) / (b.memory_share - a.memory_share)

    def min_factor(self) -> float:
        return min([self.unmeasured] + [p.factor for pts in self.points.values() for p in pts])

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "unmeasured": self.unmeasured, "notes": self.notes,
                "pairs": {f"{a}/{b}": [dataclasses.asdict(p) for p in pts] for (a, b), pts in self.points.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Interference":
        pairs = {tuple(k.split("/")): tuple(Point(**p) for p in v) for k, v in d["pairs"].items()}
        return cls(points=pairs, unmeasured=float(d.get("unmeasured", 1.0)), notes=d.get("notes", ""))

    @classmethod
    def load(cls, path: str | Path) -> "Interference":
        from nanoflow_jax.search.profile import load_json

        return load_json(path, FORMAT, "an interference table", cls.from_json)


def _chain(gemm: int, attn: int, seq: float, ovl: float, source: str) -> Point:
    return Point(attn / (gemm + attn), round(pair_factor(ovl, seq, 0.5), 3), source)


_SPLITS = "bench/results/overlap_nano_streams_splits_h200.json"
_GROUPS = "bench/results/overlap_nano_streams_h200.json"
_NOTES = "shared/notes/gpu-and-jax-facts.md, 'stream-overlap probes' (2026-12-04)"
# Seeded from one H200 (jax 0.11.2): bench.overlap's "streams2" rows (two nano-batch chains
# alternating a Mosaic GEMM, 1024 x 4096 -> 28,672, with decode attention for 256 requests x
# 1,280 keys, each chain in its own stream region under one scheduling group, ms per stage
# back to back -> overlapped). At 88/44 the single-pair probe of the notes agrees: 1.60 ms back
# to back -> 1.21-1.24 ms overlapped, the GEMM alone 0.48-0.51 ms on 88 programs and decode
# attention 0.95-0.98 ms on 44 (0.40-0.45 ms on all SMs), so the pair's ideal is
# 0.965 / (0.495 + 0.965) of back to back: factor (1.225 / 1.60) / 0.661 = 1.158.
DEFAULT_CM = (
    _chain(110, 22, 2.1879, 1.2127, f"{_SPLITS}: 110/22, 2.188 -> 1.213 ms per stage"),
    _chain(100, 32, 1.6619, 0.8905, f"{_SPLITS}: 100/32, 1.662 -> 0.891 ms per stage"),
    Point(44 / 132, round((pair_factor(0.7951, 1.378, 0.5) + pair_factor(1.225, 1.60, 0.965 / 1.46)) / 2, 3),
          f"{_GROUPS}: 88/44, 1.378 -> 0.795 ms per stage (1.154), with {_NOTES}: 88/44 pair 1.60 -> 1.21-1.24 ms "
          f"(1.158); the mean"),
    _chain(66, 66, 1.2201, 0.7832, f"{_SPLITS}: 66/66, 1.220 -> 0.783 ms per stage"),
)
DEFAULT = Interference(
    points={("compute", "memory"): DEFAULT_CM},
    unmeasured=1.0,
    notes="compute/memory pairs measured on one H200 (each point's source); compute/compute and memory/memory "
          "pairs are not measured: factor 1.0 assumed (SM shares alone decide their speed). Splits where the "
          "two budgets exceed the SM count are not factors here: the search shares the SMs out instead.")


def measure_interference(splits: Sequence[tuple[int, int]] = ((110, 22), (100, 32), (88, 44), (66, 66), (44, 88)),
                         layers: int = 8, log: Callable[[str], None] = print) -> Interference:
    """Re-measures the compute/memory factors on this GPU: bench.overlap's two-chain
    ("streams2") stages back to back and overlapped at each (GEMM, attention) split."""
    import jax

    from nanoflow_jax.search.profile import ProfileUnavailable

    if jax.default_backend() != "gpu":
        raise ProfileUnavailable(f"interference profiling overlaps kernels on two GPU streams; this backend is "
                                 f"{jax.default_backend()!r}. Run it on a GPU machine, or pass --interference FILE")
    from bench.overlap import measure

    rows = measure(("streams2",), [tuple(s) for s in splits], layers, trace=False)
    pts = []
    for row in rows:
        if "seq_ms_per_stage" not in row or "ovl_ms_per_stage" not in row:
            log(f"[interference] split {row['gemm_programs']}/{row['attn_programs']} failed: {row}")
            continue
        p = _chain(row["gemm_programs"], row["attn_programs"], row["seq_ms_per_stage"], row["ovl_ms_per_stage"],
                   f"measured: bench.overlap streams2 {row['gemm_programs']}/{row['attn_programs']}, "
                   f"{row['seq_ms_per_stage']} -> {row['ovl_ms_per_stage']} ms per stage")
        # A noisy split can read faster than ideal: no factor below 1 (sharing never beats owning).
        pts.append(dataclasses.replace(p, factor=max(1.0, p.factor)))
        log(f"[interference] {p.source}: factor {p.factor}")
    if not pts:
        raise RuntimeError("no interference split could be measured (see the log)")
    by_share: dict[float, list[Point]] = {}
    for p in pts:  # two splits of one share: their mean
        by_share.setdefault(p.memory_share, []).append(p)
    pts = [Point(f, round(sum(p.factor for p in ps) / len(ps), 3), "; ".join(p.source for p in ps))
           for f, ps in sorted(by_share.items())]
    return Interference(points={("compute", "memory"): tuple(pts)}, unmeasured=1.0,
                        notes=f"compute/memory measured on {jax.devices()[0].device_kind}; other pairs assumed 1.0")
