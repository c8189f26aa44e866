"""Kernel profiles: each operation's time against its work and its SM budget, as a JSON table.

The model-based search (nanoflow_jax.search.search) predicts an iteration's time from
these tables instead of compiling every candidate. One table per operation class:

| op | kind | work axis |
|---|---|---|
| qkv, o, gate_up, down | compute | tokens (one layer's projection) |
| lm_head | compute | rows (the last token of each request) |
| prefill_attention | compute | keys: query tokens x the keys each attends to, summed |
| decode_attention | memory | keys: decode rows x context |
| norm_rope | memory | tokens (a layer's two RMSNorms, RoPE of q and k, the KV-cache write) |
| sampler | memory | rows |

Each table holds milliseconds at a grid of (work, programs); `programs` is the kernel's
`num_programs` (its SM budget) and the grid's largest value, the SM count, stands for
the kernel's own launch (no budget: what the engine runs by default). Between grid points
time is piecewise-linear in work (made non-decreasing: more work never takes less time),
and piecewise-linear in programs; it is not forced monotone in programs, because a
budget that divides the work into whole waves can beat a larger one (bench/RESULTS.md,
"Kernels against their SM budget"). Outside the grid: below the least work the least
work's time (a launch costs it anyway), above the most work the last segment's slope;
below the least programs time grows as 1 / programs, above the most it stays.

`measure_profile` fills the tables on a GPU by timing the repository's kernels with the
benchmarks' timing core (bench.kernels.Bench, bench.timing.device_ms); elsewhere it
raises `ProfileUnavailable`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

FORMAT = "nanoflow_jax.search.profile/1"
# op -> (kind, work axis)
OPS: dict[str, tuple[str, str]] = {
    "qkv": ("compute", "tokens"), "o": ("compute", "tokens"), "gate_up": ("compute", "tokens"),
    "down": ("compute", "tokens"), "lm_head": ("compute", "rows"),
    "prefill_attention": ("compute", "keys"), "decode_attention": ("memory", "keys"),
    "norm_rope": ("memory", "tokens"), "sampler": ("memory", "rows"),
}
# Ops without an SM budget in the engine (XLA's dot and XLA's sampling): one program column.
UNBUDGETED = ("lm_head", "sampler")


class ProfileUnavailable(RuntimeError):
    """Profiling needs a GPU (the kernels' times on a CPU say nothing about one)."""


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); the end segments extend (clamped by the caller)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclasses.dataclass(frozen=True)
class OpTable:
    """Milliseconds of one op at work[i] and programs[j]: ms[i][j]."""

    work: tuple[float, ...]
    programs: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.work or not self.programs:
            raise ValueError("an op table needs at least one work value and one program count")
        if list(self.work) != sorted(set(self.work)) or list(self.programs) != sorted(set(self.programs)):
            raise ValueError("work and programs must be strictly increasing")
        if self.work[0] <= 0 or self.programs[0] < 1:
            raise ValueError("work must be > 0 and programs >= 1")
        if len(self.ms) != len(self.work) or any(len(r) != len(self.programs) for r in self.ms):
            raise ValueError(f"ms must be {len(self.work)} rows (work) x {len(self.programs)} columns (programs)")
        if any(not v > 0 for r in self.ms for v in r):
            raise ValueError("every time must be > 0 ms")
        # More work never takes less time: a running maximum down each program column.
        cols = [list(c) for c in zip(*self.ms)]
        for c in cols:
            for i in range(1, len(c)):
                c[i] = max(c[i], c[i - 1])
        object.__setattr__(self, "ms", tuple(tuple(r) for r in zip(*cols)))

    def _at_programs(self, j: int, work: float) -> float:
        col = [r[j] for r in self.ms]
        if work <= self.work[0]:
            return col[0]
        return max(col[-1] if work >= self.work[-1] else 0.0, _interp(self.work, col, work))

    def time(self, work: float, programs: float) -> float:
        """ms of `work` on `programs` programs."""
        if work <= 0:
            return 0.0
        ps = self.programs
        p = min(programs, ps[-1])
        if p < ps[0]:  # fewer programs than profiled: the same work spread thinner
            return self._at_programs(0, work) * ps[0] / max(p, 1e-9)
        per_col = [self._at_programs(j, work) for j in range(len(ps))]
        return _interp(ps, per_col, p)

    def to_json(self) -> dict[str, Any]:
        return {"work": list(self.work), "programs": list(self.programs), "ms": [list(r) for r in self.ms]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OpTable":
        return cls(work=tuple(float(w) for w in d["work"]), programs=tuple(int(p) for p in d["programs"]),
                   ms=tuple(tuple(float(v) for v in r) for r in d["ms"]))


@dataclasses.dataclass(frozen=True)
class Profile:
    """Every op's table for one model shape on one GPU.

    source: "measured" (measure_profile on a GPU) or "synthetic" (a made-up table for
    tests; never a measurement). memory_bytes: the device's memory (batch sizing)."""

    device: str
    num_sms: int
    shape: str
    dtype: str
    ops: Mapping[str, OpTable]
    source: str = "measured"
    memory_bytes: int = 0
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted(set(OPS) - set(self.ops))
        if missing:
            raise ValueError(f"the profile has no table for {missing}; profile them (measure_profile)")
        if self.source not in ("measured", "synthetic"):
            raise ValueError(f"profile source must be 'measured' or 'synthetic', got {self.source!r}")
        if self.num_sms < 1:
            raise ValueError(f"num_sms must be >= 1, got {self.num_sms}")
        object.__setattr__(self, "_memo", {})  # the search asks for the same points many times

    def time(self, op: str, work: float, programs: float | None = None) -> float:
        """ms of `op` on `work`, with `programs` programs (None: the kernel's own launch)."""
        key = (op, work, self.num_sms if programs is None else programs)
        t = self._memo.get(key)  # type: ignore[attr-defined]
        if t is None:
            t = self._memo[key] = self.ops[op].time(float(work), float(key[2]))  # type: ignore[attr-defined]
        return t

    def kind(self, op: str) -> str:
        return OPS[op][0]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "source": self.source, "device": self.device, "num_sms": self.num_sms,
                "shape": self.shape, "dtype": self.dtype, "memory_bytes": self.memory_bytes,
                "meta": dict(self.meta), "ops": {op: t.to_json() for op, t in self.ops.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(device=d["device"], num_sms=int(d["num_sms"]), shape=d["shape"], dtype=d["dtype"],
                   ops={op: OpTable.from_json(t) for op, t in d["ops"].items()}, source=d.get("source", "measured"),
                   memory_bytes=int(d.get("memory_bytes", 0)), meta=d.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return load_json(path, FORMAT, "a kernel profile", cls.from_json)


def load_json(path: str | Path, fmt: str, what: str, build: Callable[[Mapping[str, Any]], Any]) -> Any:
    """build(the JSON in path), which must carry format `fmt`; else a ValueError naming the file,
    what it should be and the command that writes one."""
    hint = f"{path} is not {what} written by `python -m nanoflow_jax.autosearch --search`"
    try:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict) or d.get("format") != fmt:
            raise ValueError(f"format {d.get('format') if isinstance(d, dict) else None!r}, want {fmt!r}")
        return build(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{hint} ({e})") from e


# ---- measuring on a GPU -----------------------------------------------------------------

DEFAULT_TOKENS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_ROWS = (64, 128, 256, 512)
DEFAULT_DECODE = ((64, 512), (64, 2048), (256, 1280), (256, 2048), (512, 2048))  # rows x context
DEFAULT_PREFILL = ((0, 128), (0, 512), (512, 512), (1280, 1024), (0, 2048))      # cached x new, 1 request


# SM shares the search assigns, as fractions of the SM count (1: the kernel's own launch);
# profiled at the same points, so the search reads measured times, not interpolated ones.
SHARE_FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0)


def default_programs(num_sms: int, fractions: Sequence[float] = SHARE_FRACTIONS) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(num_sms * f)) for f in fractions}))


def model_dims(cfg: Any) -> dict[str, int]:
    """The model's layer in the benchmarks' letters (bench.shapes): hidden E, heads H, KV heads K,
    head dim D, MLP width F, vocabulary V."""
    return dict(E=cfg.hidden_size, H=cfg.num_heads, K=cfg.num_kv_heads, D=cfg.head_dim,
                F=cfg.intermediate_size, V=cfg.vocab_size)


Part = tuple[float, Callable[[int | None], Callable], tuple, tuple, int]  # weight, make, args, rotate, thread


def _cases(bench: Any, dtype: Any) -> dict[str, Callable[[Any], tuple[float, list[Part]]]]:
    """op -> case(work point) -> (work, parts); the op's time is the weighted sum of its
    parts' times, each part `make(programs)` called on `args` (see bench.timing.device_ms)."""
    import jax.numpy as jnp
    import pallas_kernels as pk

    from nanoflow_jax.engine.sampler import GREEDY, sample, sampling_arrays_np

    e, h, k, d, f, v = (bench.m[c] for c in "EHKDFV")
    scale = d ** -0.5
    # bench.kernels' smoke runs (CPU) interpret the kernels, GEMMs on the Triton backend.
    kw: dict[str, Any] = {"interpret": True, "backend": "triton"} if bench.smoke else {}
    akw = {"interpret": True} if bench.smoke else {}

    def gemm(kd: int, nd: int, residual: bool, silu: bool = False):
        def case(t: int) -> tuple[float, list[Part]]:
            x, w = bench.rand(t, kd, dtype=dtype), bench.rand(kd, nd, dtype=dtype) / 30
            if silu:
                u = bench.rand(kd, nd, dtype=dtype) / 30
                return t, [(1.0, lambda p: (lambda a, b, c: pk.gemm_silu_mul(a, b, c, num_programs=p, **kw)),
                            (x, *bench.cold(w, u)), (1, 2), 0)]
            r = bench.rand(t, nd, dtype=dtype) if residual else None
            return t, [(1.0, lambda p: (lambda a, b, c: pk.gemm(a, b, residual=c, num_programs=p, **kw)),
                        (x, *bench.cold(w), r), (1,), 0)]
        return case

    def decode(point: tuple[int, int]) -> tuple[float, list[Part]]:
        n, ctx = point
        make, args, _ = bench.decode_case(n, ctx)
        return n * ctx, [(1.0, make, args, (), 0)]

    def prefill(point: tuple[int, int]) -> tuple[float, list[Part]]:
        cached, new = point
        g = bench.paged(1, cached + new)
        pos = jnp.arange(cached, cached + new, dtype=jnp.int32)
        args = (bench.rand(new, h, d), g["k"], g["v"], jnp.zeros((new,), jnp.int32), pos, g["bt"],
                jnp.full((1,), cached + new, jnp.int32))
        keys = new * cached + new * (new + 1) // 2
        return keys, [(1.0, lambda p: (lambda *a: pk.paged_prefill_attention(*a, scale=scale, num_programs=p, **akw)),
                       args, (), 0)]

    def norm_rope(t: int) -> tuple[float, list[Part]]:
        # A layer's memory-bound ops: two RMSNorms (with the residual), RoPE of q and of k
        # (the benchmark's rope case rotates q's H heads; k has K), the KV-cache write.
        mem = bench.memory_cases(t)
        return t, [(w, mk, args, (), thread) for w, (mk, args, _, thread) in
                   ((2.0, mem["rms_norm_res"]), (1.0 + k / h, mem["rope"]), (1.0, mem["write_kv"]))]

    def lm_head(rows: int) -> tuple[float, list[Part]]:
        x, w = bench.rand(rows, e, dtype=dtype), bench.rand(e, v, dtype=dtype) / 30
        return rows, [(1.0, lambda p: (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
                       (x, *bench.cold(w)), (1,), 0)]

    def sampler(rows: int) -> tuple[float, list[Part]]:
        arrays = sampling_arrays_np(rows)
        return rows, [(1.0, lambda p: (lambda lg: sample(lg, arrays, GREEDY)), (bench.rand(rows, v, dtype=jnp.float32),),
                       (), 0)]

    return {"qkv": gemm(e, (h + 2 * k) * d, False), "o": gemm(h * d, e, True),
            "gate_up": gemm(e, f, False, silu=True), "down": gemm(f, e, True), "prefill_attention": prefill,
            "decode_attention": decode, "norm_rope": norm_rope, "lm_head": lm_head, "sampler": sampler}


def measure_profile(cfg: Any, dtype: str = "bfloat16", *, shape: str = "", tokens: Sequence[int] = DEFAULT_TOKENS,
                    rows: Sequence[int] = DEFAULT_ROWS, decode: Sequence[tuple[int, int]] = DEFAULT_DECODE,
                    prefill: Sequence[tuple[int, int]] = DEFAULT_PREFILL, programs: Sequence[int] | None = None,
                    ops: Sequence[str] = tuple(OPS), log: Callable[[str], None] = print,
                    partial: str | Path | None = None) -> Profile:
    """Times every op of `cfg`'s layer at each work point and SM budget on this GPU.

    partial: a file that holds each op's table as soon as it is measured; a later call with
    the same file (same GPU, shape and dtype) keeps those and times only the rest, so a
    profile cut off by a time limit resumes where it stopped."""
    import re

    import jax

    if jax.default_backend() != "gpu":
        raise ProfileUnavailable(f"kernel profiling times the Pallas kernels on a GPU; this backend is "
                                 f"{jax.default_backend()!r}. Run it on a GPU machine, or pass --profile FILE "
                                 f"to search from a profile measured there")
    from bench.kernels import Bench  # the benchmarks' operands and timing (device_ms, weights past L2)

    dev = jax.devices()[0]
    key = {"format": FORMAT + "+partial", "device": dev.device_kind, "shape": shape, "dtype": dtype}
    done: dict[str, Any] = {}
    if partial and Path(partial).exists():
        saved = json.loads(Path(partial).read_text())
        if {k: saved.get(k) for k in key} == key:
            done = saved["ops"]
            log(f"[profile] resuming {partial}: {sorted(done)} already measured")

    def keep(op: str, table: OpTable) -> None:
        done[op] = table.to_json()
        if partial:
            Path(partial).write_text(json.dumps({**key, "ops": done}) + "\n")

    bench = Bench(smoke=False, budget_s=1e9, out_path=os.devnull, sections=())
    bench.m = model_dims(cfg)
    t0 = time.time()
    fill_tables(bench, dtype, {"tokens": tokens, "rows": rows, "decode_attention": decode,
                               "prefill_attention": prefill}, programs, [op for op in ops if op not in done], log,
                on_table=keep)
    tables = {op: OpTable.from_json(t) for op, t in done.items()}
    # The device's whole memory (nvidia-smi's "..., 143771 MiB"), else what JAX may allocate.
    smi = re.search(r"(\d+) MiB", str(bench.res["meta"].get("device_nvidia_smi", "")))
    memory = int(smi.group(1)) << 20 if smi else int((dev.memory_stats() or {}).get("bytes_limit", 0))
    return Profile(device=dev.device_kind, num_sms=bench.sms, shape=shape, dtype=dtype, ops=tables,
                   source="measured", memory_bytes=memory,
                   meta={**bench.res["meta"], "profile_s": round(time.time() - t0, 1)})


def fill_tables(bench: Any, dtype: str, points: Mapping[str, Sequence[Any]], programs: Sequence[int] | None,
                ops: Sequence[str], log: Callable[[str], None],
                on_table: Callable[[str, OpTable], None] = lambda op, table: None) -> dict[str, OpTable]:
    """Each op's table, timed with `bench` (a bench.kernels.Bench: its operands, its timing):
    points["tokens"] / ["rows"] for ops on those axes, points[op] for the attentions;
    on_table(op, table) as each is done."""
    import jax.numpy as jnp

    sms = bench.sms
    progs = tuple(programs or default_programs(sms))
    cases = _cases(bench, jnp.dtype(dtype))
    tables = {}
    for op in ops:
        cols = (sms,) if op in UNBUDGETED else progs
        measured: dict[float, list[float]] = {}
        for point in points.get(op, points[OPS[op][1]] if OPS[op][1] in points else ()):
            work, parts = cases[op](point)
            # The largest budget is the kernel's own launch (num_programs=None).
            measured[float(work)] = [sum(w * bench.t(make(None if p == sms else p), *args, thread=thread,
                                                     rotate=rotate) for w, make, args, rotate, thread in parts)
                                     for p in cols]
            log(f"[profile] {op} work={work} ms={[round(x, 4) for x in measured[float(work)]]}")
        work_points = sorted(measured)
        tables[op] = OpTable(tuple(work_points), tuple(cols), tuple(tuple(measured[w]) for w in work_points))
        on_table(op, tables[op])
    return tables
