"""Where an engine iteration's GPU time goes: each operation against its FLOP/byte floor.

    python -m bench.throughput ... --profile-steps 300:16,900:16 --profile-dir DIR --out R.json
    python -m bench.iteration --result R.json --trace DIR/window_300.trace.json.gz --window 300 \
        --out x.json --plot x.png        # the analysis again, offline, from the saved trace

`bench.throughput --profile-steps` traces windows of the engine's own iterations
(`jax.profiler`, CUPTI kernel records) and records each dispatched batch; this module
cuts a window's kernels into iterations and each iteration into the model's operations,
and sets each operation against its floor: max(FLOPs / GEMM peak, bytes / copy bandwidth)
for the real (unpadded) tokens, with both ceilings measured in the same run.

Kernels are attributed by position, not by a list of library kernel names: the Pallas
RMSNorm (two per layer) marks the layers; inside a layer's attention half, the kernels
before the first RoPE / cache write / attention kernel are the QKV projection, the longest
kernel after the last attention kernel and those after it the O projection (with its
residual or split-K reduction), and unnamed kernels between them attention glue; in the MLP half the two longest kernels are
the gate/up and down GEMMs (each with the kernels that follow it). After the last layer's
down GEMM, the longest kernel is the LM head and the rest the sampler. Only the Pallas
kernel set carries the markers (`--kernels pallas`, the GPU default).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Sequence

from bench import print_and_write, pyplot
from bench.timeline import gpu_kernel_records
from nanoflow_jax.config import ModelConfig

Kernel = tuple[str, int, float, float]   # (name, stream, start us, duration us)
NORM, ROPE, WRITE_KV = "rms_norm", "rope", "write_kv"
DECODE_ATTN, PREFILL_ATTN = "decode_attention", "prefill_attention"
OPS = ("embedding", "attn_norm", "qkv_gemm", "rope", "write_kv", "decode_attention", "prefill_attention",
       "attention_glue", "o_gemm", "mlp_norm", "gate_up_gemm", "down_gemm", "lm_head", "sampler")


def kernel_op(name: str) -> str | None:
    """The operation a Pallas kernel's name marks (None: unnamed, attributed by position)."""
    low = name.lower()
    for marker in (WRITE_KV, DECODE_ATTN, PREFILL_ATTN, ROPE, NORM):   # write_kv_rope is a cache write
        if marker in low:
            return marker
    return None


# --- cutting a window into iterations and operations ---------------------------------------

def split_iterations(kernels: Sequence[Kernel], num_layers: int) -> list[list[Kernel]]:
    """A traced window's kernels (sorted by start) -> one list per iteration. Each iteration
    runs 2 x num_layers RMSNorm kernels; the cut between two iterations is the widest gap
    between the last norm of one and the first norm of the next."""
    norms = [i for i, k in enumerate(kernels) if kernel_op(k[0]) == NORM]
    per = 2 * num_layers
    if not norms or len(norms) % per:
        raise ValueError(f"{len(norms)} RMSNorm kernels in the window, not a multiple of {per} (2 a layer): "
                         "was it traced whole, with the Pallas kernels (--kernels pallas)?")
    bounds = [0]
    for j in range(per, len(norms), per):
        last, first = norms[j - 1], norms[j]
        gaps = [(kernels[i + 1][2] - (kernels[i][2] + kernels[i][3]), i + 1) for i in range(last, first)]
        bounds.append(max(gaps)[1])
    bounds.append(len(kernels))
    return [list(kernels[a:b]) for a, b in zip(bounds, bounds[1:])]


def _longest(segment: Sequence[Kernel], n: int) -> list[int]:
    """Positions of the `n` longest kernels of a segment, in order."""
    return sorted(sorted(range(len(segment)), key=lambda i: -segment[i][3])[:n])


def _attention_half(seg: Sequence[Kernel], add: Any) -> None:
    named = [i for i, k in enumerate(seg) if kernel_op(k[0])]
    attn = [i for i, k in enumerate(seg) if kernel_op(k[0]) in (DECODE_ATTN, PREFILL_ATTN)]
    first, last = (named[0], attn[-1]) if named and attn else (len(seg), len(seg) - 1)
    # The O projection is the longest kernel after the attention; what lies between is glue
    # (combining partial results, merging the decode and prefill outputs).
    o_gemm = max(range(last + 1, len(seg)), key=lambda i: seg[i][3], default=len(seg))
    for i, k in enumerate(seg):
        op = kernel_op(k[0])
        add(op if op else "qkv_gemm" if i < first else "o_gemm" if i >= o_gemm else "attention_glue", k)


def _down_position(seg: Sequence[Kernel]) -> int:
    """Where the down GEMM sits in an MLP half: the later of its two longest kernels."""
    g = _longest(seg, 2)
    return g[1] if len(g) > 1 else len(seg)


def _mlp_half(seg: Sequence[Kernel], add: Any, down: int, last_layer: bool) -> None:
    """gate/up before `down`, the down GEMM from it on (with the kernels after it). After the
    last layer, the longest kernel after the down GEMM is the LM head, with the final norm
    and row gather before it, and the rest the sampler."""
    rest = range(down + 1, len(seg))
    head = max(rest, key=lambda i: seg[i][3]) if last_layer and rest else len(seg)
    for i, k in enumerate(seg):
        if i < down:
            add("gate_up_gemm", k)
        elif i == down or not last_layer:
            add("down_gemm", k)
        else:
            add("lm_head" if i <= head else "sampler", k)


def attribute(iteration: Sequence[Kernel], num_layers: int) -> dict[str, dict[str, Any]]:
    """One iteration's kernels -> {op: {"us", "kernels", "names": {kernel name: us}}}."""
    ops: dict[str, dict[str, Any]] = {}

    def add(op: str, k: Kernel) -> None:
        row = ops.setdefault(op, {"us": 0.0, "kernels": 0, "names": {}})
        row["us"] += k[3]
        row["kernels"] += 1
        row["names"][k[0]] = row["names"].get(k[0], 0.0) + k[3]

    norms = [i for i, k in enumerate(iteration) if kernel_op(k[0]) == NORM]
    if len(norms) != 2 * num_layers:
        raise ValueError(f"an iteration with {len(norms)} RMSNorm kernels, expected {2 * num_layers}")
    for k in iteration[: norms[0]]:
        add("embedding", k)
    down = None   # where the down GEMM sits in an MLP half, from the layers before the last
    for layer in range(num_layers):
        a, m = norms[2 * layer], norms[2 * layer + 1]
        end = norms[2 * layer + 2] if layer + 1 < num_layers else len(iteration)
        add("attn_norm", iteration[a])
        _attention_half(iteration[a + 1: m], add)
        add("mlp_norm", iteration[m])
        seg = iteration[m + 1: end]
        if layer + 1 < num_layers:
            down = _down_position(seg)
            _mlp_half(seg, add, down, last_layer=False)
        else:   # the last layer runs the same scan body: its down GEMM sits where the others' did
            _mlp_half(seg, add, down if down is not None else _longest(seg, 3)[1], last_layer=True)
    for row in ops.values():
        row["us"] = round(row["us"], 2)
        top = sorted(row["names"].items(), key=lambda kv: -kv[1])[:4]
        row["names"] = {name[:120]: round(us, 1) for name, us in top}
    return ops


def busy_us(kernels: Sequence[Kernel]) -> float:
    """Time at least one kernel ran (the union of their intervals)."""
    total, end = 0.0, float("-inf")
    for _, _, start, dur in sorted(kernels, key=lambda k: k[2]):
        a, b = max(start, end), start + dur
        if b > a:
            total += b - a
        end = max(end, b)
    return total


# --- floors ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ceilings:
    gemm_tflops: float   # the run's GEMM peak
    copy_gbs: float      # the run's device copy, bytes read plus written per second


def step_record(batch: Any, bucket: tuple[int, int], decode_only: bool, kv_elem: int = 2) -> dict[str, Any]:
    """What `op_floors` needs of one dispatched `ScheduledBatch` (JSON-able); kv_elem: bytes
    an element of the KV cache (1 for fp8)."""
    rows = batch.rows
    decodes = [r.start + r.length for r in rows[: batch.num_decode]]
    return {"tokens": int(batch.num_tokens), "rows": len(rows), "decodes": len(decodes),
            "decode_context": int(sum(decodes)), "prefill": [[int(r.start), int(r.length)] for r in rows[batch.num_decode:]],
            "bucket_tokens": int(bucket[0]), "bucket_width": int(bucket[1]), "decode_only": bool(decode_only),
            "kv_elem": int(kv_elem)}


def op_floors(cfg: ModelConfig, step: dict[str, Any], ceil: Ceilings, elem: int = 2) -> dict[str, dict[str, Any]]:
    """Each operation's FLOPs, bytes and floor (us) for the real tokens of one iteration
    (`step_record`); bf16 activations and weights (`elem` bytes), the cache's own element
    size (the record's `kv_elem`, bf16 when absent), float32 logits."""
    n, r, L = step["tokens"], step["rows"], cfg.num_layers
    kv_elem = step.get("kv_elem", elem)
    e, i_, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.q_size, cfg.kv_size
    hq, d = cfg.num_heads, cfg.head_dim
    ctx = step["decode_context"]
    pre_keys = sum(ln * s + ln * (ln + 1) // 2 for s, ln in step["prefill"])   # causal keys per query head
    pre_ctx = sum(s + ln for s, ln in step["prefill"])
    pre_q = sum(ln for _, ln in step["prefill"])
    work = {   # op: (FLOPs, bytes) for the whole iteration
        "embedding": (0, 2 * n * e * elem),
        "attn_norm": (0, L * 2 * n * e * elem),
        "qkv_gemm": (L * 2 * n * e * (q + 2 * kv), L * (e * (q + 2 * kv) + n * e + n * (q + 2 * kv)) * elem),
        "rope": (0, L * 2 * n * (q + kv) * elem),
        "write_kv": (0, L * n * 2 * kv * (elem + kv_elem)),
        "decode_attention": (L * 4 * ctx * hq * d, L * (ctx * 2 * kv * kv_elem + 2 * step["decodes"] * q * elem)),
        "prefill_attention": (L * 4 * pre_keys * hq * d, L * (pre_ctx * 2 * kv * kv_elem + 2 * pre_q * q * elem)),
        "o_gemm": (L * 2 * n * q * e, L * (q * e + n * q + 2 * n * e) * elem),
        "mlp_norm": (0, L * 2 * n * e * elem),
        "gate_up_gemm": (L * 2 * n * e * 2 * i_, L * (e * 2 * i_ + n * e + n * i_) * elem),
        "down_gemm": (L * 2 * n * i_ * e, L * (i_ * e + n * i_ + 2 * n * e) * elem),
        "lm_head": (2 * r * e * v, e * v * elem + r * e * elem + r * v * 4),
        "sampler": (0, r * v * 4),
    }
    out = {}
    for op, (flops, nbytes) in work.items():
        compute_us, memory_us = flops / ceil.gemm_tflops / 1e6, nbytes / ceil.copy_gbs / 1e3
        out[op] = {"flops": int(flops), "bytes": int(nbytes), "floor_us": round(max(compute_us, memory_us), 2),
                   "bound": "compute" if compute_us >= memory_us else "memory"}
    return out


# --- tracing windows of a running engine -----------------------------------------------------

def parse_windows(spec: str | None) -> list[tuple[int, int]]:
    """'300:16,900:16' -> [(300, 16), (900, 16)]: engine steps START .. START + COUNT - 1."""
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        try:
            start, count = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"--profile-steps {spec!r}: expected START:COUNT[,START:COUNT...], e.g. 300:16") from None
        if start < 0 or count < 2:
            raise ValueError(f"--profile-steps {part!r}: START must be >= 0 and COUNT >= 2")
        out.append((start, count))
    out.sort()
    if any(a + n > b for (a, n), (b, _) in zip(out, out[1:])):
        raise ValueError(f"--profile-steps {spec!r}: the windows overlap")
    return out


class WindowTracer:
    """Traces windows of an engine's steps with jax.profiler and records every batch
    dispatched inside them. The device is drained (the in-flight iteration waited for) as a
    window opens and closes, so a window's trace holds exactly its dispatched iterations,
    whole; that costs one pipeline bubble per window edge, outside the traced span."""

    def __init__(self, engine: Any, windows: list[tuple[int, int]], out_dir: str | Path | None) -> None:
        if windows and out_dir is None:
            raise ValueError("traced windows need a folder to go to")
        self.engine, self.windows = engine, windows
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.steps_seen = 0
        self.active: tuple[int, int] | None = None
        self.records: list[dict[str, Any]] = []
        self.traced: list[dict[str, Any]] = []   # per window: start, count, its steps, the trace file
        self.all_steps: list[dict[str, Any]] = []   # every dispatched batch of the run (`run_floor`)

    def _drain(self) -> None:
        import jax

        jax.block_until_ready(self.engine.runner.cache)

    def _open(self, window: tuple[int, int]) -> None:
        import jax

        self._drain()
        self.active, self.records = window, []
        self._dir = self.out_dir / f"window_{window[0]}"
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0   # the Python tracer would record every call of the engine
        jax.profiler.start_trace(str(self._dir), create_perfetto_trace=True, profiler_options=opts)

    def _close(self) -> None:
        import jax

        self._drain()
        jax.profiler.stop_trace()
        start = self.active[0]
        trace = next(self._dir.rglob("perfetto_trace.json.gz"), None)
        entry = {"start": start, "count": self.active[1], "steps": self.records, "trace": None}
        if trace is not None:
            entry["trace"] = str(trace.rename(self.out_dir / f"window_{start}.trace.json.gz"))
        shutil.rmtree(self._dir, ignore_errors=True)   # the raw XSpace: large, and in the trace already
        self.traced.append(entry)
        self.active = None

    def installed(self) -> Any:
        import contextlib

        engine, runner = self.engine, self.engine.runner
        inner_step, inner_dispatch = engine.step, runner.dispatch
        tracer = self

        def step() -> Any:
            i = tracer.steps_seen
            tracer.steps_seen += 1
            window = next((w for w in tracer.windows if w[0] == i), None)
            if window is not None and tracer.active is None:
                tracer._open(window)
            try:
                return inner_step()
            finally:
                if tracer.active is not None and i == sum(tracer.active) - 1:
                    tracer._close()

        def dispatch(batch: Any, prev_tokens: Any, send: Any = None) -> Any:
            bucket = runner.bucket_for(batch)
            decode_only = runner.decode_only_steps and batch.num_decode == len(batch.rows)
            record = step_record(batch, bucket, decode_only, runner.kv_dtype.itemsize)
            tracer.all_steps.append(record)
            if tracer.active is not None:
                tracer.records.append(record)
            return inner_dispatch(batch, prev_tokens, send)

        @contextlib.contextmanager
        def ctx() -> Any:
            # Instance attributes shadow the methods; another wrapper's attribute is put back after.
            saved = [(obj, name, vars(obj).get(name)) for obj, name in ((engine, "step"), (runner, "dispatch"))]
            engine.step, runner.dispatch = step, dispatch
            try:
                yield self
            finally:
                if tracer.active is not None:   # the run ended inside a window
                    tracer._close()
                for obj, name, value in saved:
                    if value is None:
                        delattr(obj, name)
                    else:
                        setattr(obj, name, value)
                # The records outlive the run; the engine (its KV pool and weights) must not.
                tracer.engine = None
        return ctx()

    def reports(self, cfg: ModelConfig, ceil: Ceilings) -> dict[str, Any]:
        """Every traced window analysed, merged (`merge_windows`)."""
        reports = []
        for w in self.traced:
            if w["trace"] is None:
                reports.append({"measured": False, "note": "the profiler wrote no perfetto trace", **w})
                continue
            with gzip.open(w["trace"], "rt") as f:
                trace = json.load(f)
            try:
                reports.append({**w, **analyze(trace, w["steps"], cfg, ceil)})
            except ValueError as e:   # the raw files stay for `python -m bench.iteration`
                reports.append({**w, "measured": False, "note": str(e)})
        return {**merge_windows(reports), "ceilings": dataclasses.asdict(ceil)}


def run_floor(cfg: ModelConfig, steps: Sequence[dict[str, Any]], ceil: Ceilings) -> dict[str, float]:
    """The floor of a whole run's iterations: `sequential` sums every operation's floor (each
    op alone on the GPU), `overlapped` takes per iteration the larger of all its FLOPs at the
    GEMM peak and all its bytes at the copy bandwidth (compute and memory fully hidden under
    each other, NanoFlow's ideal)."""
    def us(flops: float, nbytes: float) -> float:   # unrounded: the sums keep sequential >= overlapped
        return max(flops / ceil.gemm_tflops / 1e6, nbytes / ceil.copy_gbs / 1e3)

    seq = ovl = 0.0
    for step in steps:
        floors = op_floors(cfg, step, ceil).values()
        seq += sum(us(f["flops"], f["bytes"]) for f in floors)
        ovl += us(sum(f["flops"] for f in floors), sum(f["bytes"] for f in floors))
    return {"iterations": len(steps), "sequential_s": round(seq / 1e6, 9), "overlapped_s": round(ovl / 1e6, 9)}


# --- a window's report ----------------------------------------------------------------------

def iteration_rows(iterations: list[list[Kernel]], steps: Sequence[dict[str, Any]], cfg: ModelConfig,
                   ceil: Ceilings) -> list[dict[str, Any]]:
    if len(iterations) != len(steps):
        raise ValueError(f"{len(iterations)} iterations traced against {len(steps)} dispatched: the window "
                         "must be drained at both ends (bench.throughput --profile-steps does)")
    rows = []
    for j, (its, step) in enumerate(zip(iterations, steps)):
        span = its[-1][2] + its[-1][3] - its[0][2]
        nxt = iterations[j + 1][0][2] - (its[-1][2] + its[-1][3]) if j + 1 < len(iterations) else None
        ops = attribute(its, cfg.num_layers)
        floors = op_floors(cfg, step, ceil)
        rows.append({"step": step, "span_us": round(span, 1), "busy_us": round(busy_us(its), 1),
                     "gap_after_us": None if nxt is None else round(nxt, 1), "kernels": len(its),
                     "ops": ops, "floors": floors,
                     "floor_us": round(sum(f["floor_us"] for f in floors.values()), 1)})
    return rows


def breakdown_table(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One iteration's operations: time, floor and what is above the floor, largest waste first."""
    table = []
    for op in OPS:
        us = row["ops"].get(op, {}).get("us", 0.0)
        floor = row["floors"].get(op, {}).get("floor_us", 0.0)
        if us or floor:
            table.append({"op": op, "us": round(us, 1), "floor_us": floor, "waste_us": round(us - floor, 1),
                          "of_floor": round(floor / us, 3) if us else None,
                          "bound": row["floors"].get(op, {}).get("bound"),
                          "kernels": row["ops"].get(op, {}).get("kernels", 0)})
    gaps = row["span_us"] - row["busy_us"]
    table.append({"op": "gaps inside the iteration", "us": round(gaps, 1), "floor_us": 0.0, "waste_us": round(gaps, 1),
                  "of_floor": 0.0, "bound": None, "kernels": 0})
    return sorted(table, key=lambda t: -t["waste_us"])


def representative(rows: list[dict[str, Any]], mixed: bool) -> dict[str, Any] | None:
    """The iteration of median span among the mixed (some prefill) or pure-decode ones."""
    pick = sorted((r for r in rows if bool(r["step"]["prefill"]) == mixed), key=lambda r: r["span_us"])
    return pick[len(pick) // 2] if pick else None


def window_summary(iterations: list[list[Kernel]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Device time of a window: kernels, gaps inside iterations, idle between them."""
    span = iterations[-1][-1][2] + iterations[-1][-1][3] - iterations[0][0][2]
    between = sum(r["gap_after_us"] for r in rows if r["gap_after_us"] is not None)
    inside = sum(r["span_us"] - r["busy_us"] for r in rows)
    return {"iterations": len(rows), "span_us": round(span, 1),
            "idle_between_iterations_share": round(between / span, 4),
            "gaps_inside_iterations_share": round(inside / span, 4),
            "idle_between_iterations_per_iteration_us": round(between / max(len(rows) - 1, 1), 1)}


def analyze(trace: dict[str, Any], steps: Sequence[dict[str, Any]], cfg: ModelConfig,
            ceil: Ceilings) -> dict[str, Any]:
    """A traced window (perfetto trace dict) and its dispatched steps -> the report."""
    kernels = [k for k in gpu_kernel_records(trace) if not k[0].lower().startswith("memcpy")]
    if not kernels:
        return {"measured": False, "note": "no GPU kernel records in the trace (not a GPU run)"}
    iterations = split_iterations(kernels, cfg.num_layers)
    rows = iteration_rows(iterations, steps, cfg, ceil)
    out: dict[str, Any] = {"measured": True, "ceilings": dataclasses.asdict(ceil),
                           "window": window_summary(iterations, rows), "representative": {}}
    for label, mixed in (("mixed", True), ("decode", False)):
        row = representative(rows, mixed)
        if row is not None:
            out["representative"][label] = {**{k: row[k] for k in ("step", "span_us", "busy_us", "floor_us", "kernels")},
                                            "of_floor": round(row["floor_us"] / row["span_us"], 3),
                                            "table": breakdown_table(row), "ops": row["ops"]}
    out["iterations"] = [{k: r[k] for k in ("span_us", "busy_us", "gap_after_us", "kernels", "floor_us")}
                         | {"tokens": r["step"]["tokens"], "decodes": r["step"]["decodes"],
                            "bucket_tokens": r["step"]["bucket_tokens"], "decode_only": r["step"]["decode_only"]}
                         for r in rows]
    out["median_iteration_us"] = round(statistics.median(r["span_us"] for r in rows), 1)
    return out


def merge_windows(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several windows' reports -> one: device idle over all of them, the representative
    iterations from the windows that had each kind."""
    measured = [r for r in reports if r.get("measured")]
    if not measured:
        return {"measured": False, "note": reports[0].get("note") if reports else "no window was traced",
                "windows": list(reports)}
    span = sum(r["window"]["span_us"] for r in measured)
    between = sum(r["window"]["idle_between_iterations_share"] * r["window"]["span_us"] for r in measured)
    inside = sum(r["window"]["gaps_inside_iterations_share"] * r["window"]["span_us"] for r in measured)
    rep: dict[str, Any] = {}
    for r in measured:
        for label, row in r["representative"].items():
            rep.setdefault(label, row)
    return {"measured": True, "windows": list(reports), "representative": rep,
            "idle_between_iterations_share": round(between / span, 4),
            "gaps_inside_iterations_share": round(inside / span, 4)}


def plot(report: dict[str, Any], png: str, title: str = "") -> None:
    """One panel per representative iteration: each operation's time against its floor."""
    plt = pyplot()
    reps = report.get("representative", {})
    if not reps:
        return
    fig, axes = plt.subplots(1, len(reps), figsize=(7 * len(reps), 6), squeeze=False)
    for ax, (label, rep) in zip(axes[0], reps.items()):
        table = sorted(rep["table"], key=lambda t: t["us"])
        names = [t["op"] for t in table]
        ax.barh(names, [t["us"] / 1e3 for t in table], color="tab:orange", label="measured")
        ax.barh(names, [t["floor_us"] / 1e3 for t in table], color="tab:blue", label="floor")
        s = rep["step"]
        ax.set_title(f"{label}: {s['tokens']} tokens ({s['decodes']} decodes, bucket {s['bucket_tokens']})\n"
                     f"{rep['span_us'] / 1e3:.1f} ms against a {rep['floor_us'] / 1e3:.1f} ms floor "
                     f"({100 * rep['of_floor']:.0f}%)", fontsize=10)
        ax.set_xlabel("ms per iteration")
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iteration", description=__doc__.split("\n\n")[0])
    p.add_argument("--result", required=True, help="the bench.throughput result JSON of a --profile-steps run")
    p.add_argument("--trace", required=True, help="one of its windows' perfetto traces (window_START.trace.json.gz)")
    p.add_argument("--window", type=int, required=True, help="that window's START step")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    result = json.loads(Path(a.result).read_text())
    prof = result.get("iteration_profile", {})
    windows = {w["start"]: w for w in prof.get("windows", [])}
    if a.window not in windows:
        p.error(f"{a.result} holds no traced window starting at step {a.window} (it has {sorted(windows)})")
    with gzip.open(a.trace, "rt") if a.trace.endswith(".gz") else open(a.trace) as f:
        trace = json.load(f)
    ceil = Ceilings(**prof["ceilings"])
    report = analyze(trace, windows[a.window]["steps"], ModelConfig.from_name(result["model"]), ceil)
    print_and_write(report, a.out)
    if a.plot:
        plot(report, a.plot, f"{result['model']} on {result.get('device', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
