"""Which mechanism lets a GEMM and decode attention share one GPU inside a JAX program?

    python -m bench.overlap --out bench/results/overlap_h200.json [--layers 8] [--splits 88/44,100/32x4:bk64:s2]

Each *stage* runs the decode attention of one nano-batch (a bare Pallas kernel) beside a
prefill-sized GEMM of the other (a Mosaic GPU kernel), each capped to its share of the
SMs; the next stage swaps the roles (NanoFlow's two-nano-batch ping-pong), so
`2 x layers` stages form a chain with a real dependency between consecutive stages.
Every mechanism runs the chain back to back ("seq") and with the attention in a
`compute_on("gpu_stream:1")` region ("ovl"):

- pair:       one stage in one jitted program (the ceiling a single pair reaches);
- unrolled:   the whole chain unrolled in one program;
- scan:       `lax.scan` over the stages, one stage per loop body;
- scan_layer: `lax.scan` over layers, two stages per body;
- dispatch:   one jitted program per stage, dispatched back to back from Python;
- fused:      horizontal fusion, no streams: "ovl" is one launch per stage whose programs
              split between Triton GEMM tiles and attention items
              (`pallas_kernels.horizontal`, GEMM/ATTN programs as the split says), "seq"
              the same Triton GEMM on the whole GPU then the default decode attention.

Reported per mechanism: wall ms per stage (median), the gain seq / ovl, the compiled
order of region starts/dones (S/D) and other custom calls (G) in the program (overlap
needs a G between an S and its D), and, from a `jax.profiler` trace of each ovl variant,
the share of attention-kernel time that ran while a GEMM kernel ran on another stream.
Every array is a jit argument: closed-over KV pages would become HLO constants.

A split (`--splits`, comma-separated) is `GEMM/ATTN[xPER_SM][:bkN][:sN][:wN]`: the GEMM's
and the attention's program counts ('all': the whole GPU; `88` alone means 88/88), then
the attention's launch options: programs per SM of its budget, block_k, num_stages and
num_warps (`100/32x4:bk64:s2` is 32 SMs at 4 programs each, 64-key blocks in 2 stages;
an option left out takes `decode_launch`'s default). Each row records the options, the
launch as resolved (`programs`, `num_splits`, `block_k`, `num_stages`, `num_warps`), and,
once per split, the capped attention and the capped GEMM each alone (`attn_alone_ms`,
`gemm_alone_ms`: ms per call over `2 x layers` dependent calls in one program, as a chain's
stages run) with `ideal_ms`, their max: the stage time a perfect overlap would reach.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import run_metadata
from bench.timeline import gpu_kernel_records, jax_trace
from nanoflow_jax.models.streams import on_stream
from pallas_kernels._common import num_sms
from pallas_kernels.decode_attention import DecodeLaunch, decode_launch, paged_decode_attention
from pallas_kernels.gemm import gemm
from pallas_kernels.gemm_triton import gemm_triton
from pallas_kernels.horizontal import gemm_beside_decode_attention

# Llama-3-8B heads; a 1024-token GEMM (gate/up width) beside 256 decodes at 1,280 keys.
M, K, N = 1024, 4096, 28672
REQS, CTX, HEADS, KV_HEADS, HEAD_DIM, PAGE = 256, 1280, 32, 8, 128, 16
MECHANISMS = ("pair", "unrolled", "scan", "scan_layer", "dispatch", "streams", "streams2", "streams_scan", "fused")
FUSED_GEMM = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)   # the fused launch's GEMM tiles
Event = tuple[str, int, float, float]  # kernel name, stream (thread id), start us, duration us


def operands(seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 5)
    width = CTX // PAGE
    pages = REQS * width + 1
    kv_shape = (pages * PAGE, KV_HEADS, HEAD_DIM)
    perm = np.random.default_rng(seed).permutation(np.arange(1, pages, dtype=np.int32))
    return {
        "x": jax.random.normal(keys[0], (M, K), jnp.bfloat16),
        "w": (jax.random.normal(keys[1], (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16),
        "q": jax.random.normal(keys[2], (REQS, HEADS, HEAD_DIM), jnp.bfloat16),
        "kf": jax.random.normal(keys[3], kv_shape, jnp.bfloat16),
        "vf": jax.random.normal(keys[4], kv_shape, jnp.bfloat16),
        "bt": jnp.asarray(perm.reshape(REQS, width)),
        "cl": jnp.full((REQS,), CTX, jnp.int32),
    }


SPLIT_FORM = "GEMM[/ATTN[xPER_SM][:bkN][:sN][:wN]], GEMM and ATTN a program count or 'all' (e.g. 100/32x4:bk64:s2)"
_OPTIONS = {"bk": "block_k", "s": "num_stages", "w": "num_warps"}


@dataclasses.dataclass(frozen=True)
class Split:
    """The SM shares of one GEMM/attention pair and the attention's launch options.
    None: the whole GPU (a program count) or `decode_launch`'s default (an option)."""

    gemm_programs: int | None
    attn_programs: int | None
    programs_per_sm: int | None = None
    block_k: int | None = None
    num_stages: int | None = None
    num_warps: int | None = None

    def __str__(self) -> str:
        """The split's `--splits` text (parse_splits reads it back)."""
        def count(v: int | None) -> str:
            return "all" if v is None else str(v)
        text = f"{count(self.gemm_programs)}/{count(self.attn_programs)}"
        text += "" if self.programs_per_sm is None else f"x{self.programs_per_sm}"
        return text + "".join(f":{key}{getattr(self, name)}" for key, name in _OPTIONS.items()
                              if getattr(self, name) is not None)


def make_stage(split: Split, region: bool, interpret: bool,
               gemm_stream: int = 0) -> tuple[Callable[..., tuple[jax.Array, jax.Array]], Callable[..., jax.Array]]:
    """(stage, prepare): stage(qg, x, w, kf, vf, bt, cl) -> (attention partials, GEMM output)."""
    warps = {} if split.num_warps is None else {"num_warps": split.num_warps}  # else decode_launch's default
    launch = decode_launch((REQS, HEADS, HEAD_DIM), (1, PAGE, KV_HEADS, HEAD_DIM), CTX // PAGE,
                           scale=HEAD_DIM ** -0.5, num_programs=split.attn_programs, interpret=interpret,
                           programs_per_sm=split.programs_per_sm, block_k=split.block_k,
                           num_stages=split.num_stages, **warps)
    attn = on_stream(launch.kernel, 1) if region else launch.kernel
    bare_mm = functools.partial(gemm, num_programs=split.gemm_programs, interpret=interpret)
    mm = on_stream(bare_mm, gemm_stream) if region else bare_mm

    def stage(qg, x, w, kf, vf, bt, cl):
        acc = attn(qg, kf, vf, bt, cl)[0]   # the output (one split) or the partials
        return acc, mm(x, w)
    # The bare ops, for mechanisms that place them themselves (a whole chain in a region).
    stage.attn, stage.mm, stage.launch = launch.kernel, bare_mm, launch

    def prepare(q):
        return launch.prepare(q, jnp.zeros((1, PAGE, KV_HEADS, HEAD_DIM), q.dtype),
                              jnp.zeros((1, PAGE, KV_HEADS, HEAD_DIM), q.dtype), jnp.zeros((1, 1), jnp.int32),
                              jnp.zeros((1,), jnp.int32))[0]
    return stage, prepare


def make_fused_stage(split: Split, fused: bool, interpret: bool) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """stage(q, x, w, kf, vf, bt, cl) -> (attention output, GEMM output): one horizontally
    fused launch (GEMM on split.gemm_programs programs, attention on split.attn_programs x
    programs_per_sm; 'all' is every SM), or (fused=False) the same Triton GEMM on the whole
    GPU followed by the default decode attention."""
    scale = HEAD_DIM ** -0.5
    as_pages = lambda f: f.reshape(-1, PAGE, KV_HEADS, HEAD_DIM)   # the flat pages' own layout
    if fused:
        g = split.gemm_programs or num_sms()
        a = (split.attn_programs or num_sms()) * (split.programs_per_sm or 1)
        opts = {} if split.block_k is None else {"attention_block_k": split.block_k}
        opts.update({k: v for k, v in (("num_stages", split.num_stages), ("num_warps", split.num_warps)) if v})

        def stage(q, x, w, kf, vf, bt, cl):
            y, o = gemm_beside_decode_attention(x, w, q, as_pages(kf), as_pages(vf), bt, cl, scale=scale,
                                                gemm_programs=g, attention_programs=a, interpret=interpret,
                                                **{**FUSED_GEMM, **opts})
            return o, y
        return stage

    def stage(q, x, w, kf, vf, bt, cl):
        y = gemm_triton(x, w, interpret=interpret, **FUSED_GEMM)
        return paged_decode_attention(q, as_pages(kf), as_pages(vf), bt, cl, scale=scale, interpret=interpret), y
    return stage


def _dep(base: jax.Array, src: jax.Array) -> jax.Array:
    """base plus 0 x one element of src: a true data dependency that leaves base's values.
    Plain lax ops (no jitted jnp helper), so it may sit inside a stream region."""
    one = jax.lax.slice(src, (0,) * src.ndim, (1,) * src.ndim).reshape(())
    return base + (one * 0).astype(base.dtype)


def _next(qg0: jax.Array, x0: jax.Array, acc: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The next stage's inputs: its attention reads this GEMM's output, its GEMM this
    attention's output."""
    return _dep(qg0, g), _dep(x0, acc)


def _chain(stage: Callable[..., Any], q: jax.Array, x: jax.Array, rest: tuple[jax.Array, ...], layers: int,
           attention_first: bool, scan: bool) -> tuple[jax.Array, jax.Array]:
    """One nano-batch's layers: GEMM -> attention -> GEMM ... (or attention first), each op
    reading the previous one's output. `stage` runs one attention and one GEMM; here only one
    of the two is used per step (the other's inputs are this chain's own)."""
    attn, mm = stage.attn, stage.mm  # type: ignore[attr-defined]
    w, kf, vf, bt, cl = rest

    def layer(carry, _):
        q, x = carry
        if attention_first:
            x = _dep(x, attn(q, kf, vf, bt, cl)[0])
            q = _dep(q, mm(x, w))
        else:
            q = _dep(q, mm(x, w))
            x = _dep(x, attn(q, kf, vf, bt, cl)[0])
        return (q, x), None

    if scan:
        (q, x), _ = jax.lax.scan(layer, (q, x), None, length=layers)
        return q, x
    for _ in range(layers):
        (q, x), _ = layer((q, x), None)
    return q, x


def build(mechanism: str, stage: Callable[..., Any], layers: int, region: bool) -> Callable[..., Any]:
    """A callable of (qg, x, w, kf, vf, bt, cl) running the mechanism's chain."""
    stages = 1 if mechanism == "pair" else 2 * layers

    if mechanism.startswith("streams"):
        # Two independent nano-batches, each a whole chain of layers: A on stream 1 (one
        # region), B starting with its attention, so A's GEMMs meet B's attention; B runs on
        # the main stream, or (streams2) in a region on stream 2 with both regions in one
        # XLA scheduling group. Nothing ties the two until both finish.
        scan = mechanism == "streams_scan"

        def chains(qg, x, w, kf, vf, bt, cl):
            rest = (w, kf, vf, bt, cl)
            a = functools.partial(_chain, stage, rest=rest, layers=layers, attention_first=False, scan=scan)
            b = functools.partial(_chain, stage, rest=rest, layers=layers, attention_first=True, scan=scan)
            if region:
                a = on_stream(a, 1)
                b = on_stream(b, 2) if mechanism == "streams2" else b
            group = contextlib.nullcontext()
            if region and mechanism == "streams2":
                from jax.experimental.xla_metadata import set_xla_metadata
                group = set_xla_metadata(_scheduling_group_id="1")
            with group:
                qa, xa = a(qg, x)
                qb, xb = b(qg, x)
            return qa, xa, qb, xb
        return jax.jit(chains)

    if mechanism == "dispatch":
        step = jax.jit(lambda qg0, x0, q, x, *rest: (lambda a, g: _next(qg0, x0, a, g))(*stage(q, x, *rest)))

        def run(qg, x, w, kf, vf, bt, cl):
            q, xx = qg, x
            for _ in range(stages):
                q, xx = step(qg, x, q, xx, w, kf, vf, bt, cl)
            return q, xx
        return run

    def chain(qg, x, w, kf, vf, bt, cl):
        rest = (w, kf, vf, bt, cl)
        if mechanism in ("pair", "unrolled"):
            q, xx = qg, x
            for _ in range(stages):
                q, xx = _next(qg, x, *stage(q, xx, *rest))
            return q, xx

        def body(carry, _):
            q, xx = carry
            for _ in range(1 if mechanism == "scan" else 2):
                q, xx = _next(qg, x, *stage(q, xx, *rest))
            return (q, xx), None
        (q, xx), _ = jax.lax.scan(body, (qg, x), None, length=stages if mechanism == "scan" else layers)
        return q, xx
    return jax.jit(chain)


def _repeated(op: Callable[..., jax.Array], calls: int) -> Callable[..., jax.Array]:
    """op(a, *rest) `calls` times in one jitted program, each call's `a` depending on the
    previous output (as a chain's stages do), so the time per call leaves out dispatch."""
    def run(a, *rest):
        out = op(a, *rest)
        for _ in range(calls - 1):
            out = op(_dep(a, out), *rest)
        return out
    return jax.jit(run)


def alone_ms(split: Split, layers: int, interpret: bool, ops: dict[str, jax.Array]) -> dict[str, Any]:
    """The split's capped attention and capped GEMM each alone (ms per call, over the
    `2 x layers` calls a chain has), their max (the ideal overlapped stage) and the launch
    the attention resolved to."""
    out: dict[str, Any] = {}
    calls = 2 * layers
    try:
        stage, prepare = make_stage(split, False, interpret)
        launch: DecodeLaunch = stage.launch  # type: ignore[attr-defined]
        out.update(programs=launch.programs, num_splits=launch.num_splits, block_k=launch.block_k,
                   num_stages=launch.num_stages, num_warps=launch.num_warps)
        attn = _repeated(lambda q, *rest: stage.attn(q, *rest)[0], calls)  # type: ignore[attr-defined]
        mm = _repeated(stage.mm, calls)  # type: ignore[attr-defined]
        out["attn_alone_ms"] = round(wall_ms(attn, (prepare(ops["q"]), ops["kf"], ops["vf"], ops["bt"], ops["cl"]))
                                     / calls, 4)
        out["gemm_alone_ms"] = round(wall_ms(mm, (ops["x"], ops["w"])) / calls, 4)
        out["ideal_ms"] = max(out["attn_alone_ms"], out["gemm_alone_ms"])
    except Exception as e:  # a failing launch is a finding too; the mechanisms still run
        out["alone_error"] = repr(e)[:400]
    return out


def compiled_order(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """S (region start), D (region done), G (other custom call) in the compiled HLO, per
    computation that holds a region, joined by '|'."""
    if not hasattr(fn, "lower"):
        return ""
    text = fn.lower(*args).compile().as_text()
    orders = []
    for comp in text.split("\n\n"):
        o = "".join("S" if "call-start(" in l else "D" if "call-done(" in l else "G" if "custom-call(" in l else ""
                    for l in comp.splitlines())
        if "S" in o:
            orders.append(o)
    return "|".join(orders)


def wall_ms(fn: Callable[..., Any], args: tuple[Any, ...], iters: int = 10) -> float:
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def trace_events(fn: Callable[..., Any], args: tuple[Any, ...]) -> list[Event]:
    """GPU kernel records of one call (after a warm one), with the stream each ran on."""
    jax.block_until_ready(fn(*args))
    return gpu_kernel_records(jax_trace(lambda: jax.block_until_ready(fn(*args))))


def overlap_stats(events: list[Event]) -> dict[str, float]:
    """How much attention-kernel time ran while a kernel of another stream ran."""
    attn = [e for e in events if "decode_attention" in e[0]]
    others = [e for e in events if "decode_attention" not in e[0]]
    covered = 0.0
    for _, stream, t0, dur in attn:
        spans = sorted((max(t0, o[2]), min(t0 + dur, o[2] + o[3])) for o in others if o[1] != stream)
        end = t0
        for a, b in spans:
            a = max(a, end)
            if b > a:
                covered += b - a
                end = b
    total = sum(e[3] for e in attn)
    span = (max(e[2] + e[3] for e in events) - min(e[2] for e in events)) if events else 0.0
    return {"attention_us": round(total, 1), "attention_beside_gemm": round(covered / total, 3) if total else 0.0,
            "kernels": len(events), "span_us": round(span, 1), "streams": len({e[1] for e in events})}


def measure(mechanisms: tuple[str, ...], splits: Sequence[Split | tuple[int | None, int | None]], layers: int,
            trace: bool, gemm_stream: int = 0, hlo_dir: str | None = None) -> list[dict[str, Any]]:
    """One row per split and mechanism. A split may be a plain (GEMM, attention) program
    pair, as nanoflow_jax.search.interference passes."""
    interpret = jax.default_backend() == "cpu"
    ops = operands()
    rows = []
    for split in splits:
        split = split if isinstance(split, Split) else Split(*split)
        alone = alone_ms(split, layers, interpret, ops)  # mechanism-independent: once per split
        for mech in mechanisms:
            row: dict[str, Any] = {"mechanism": mech, "gemm_programs": split.gemm_programs,
                                   "attn_programs": split.attn_programs, "attn_programs_per_sm": split.programs_per_sm,
                                   **alone, "layers": layers, "gemm_stream": gemm_stream}
            stages = 1 if mech == "pair" else 2 * layers  # a stage: one attention and one GEMM
            for mode in ("seq", "ovl"):
                try:
                    if mech == "fused":   # no regions: one chain of fused (ovl) or back-to-back (seq) stages
                        fn = build("unrolled", make_fused_stage(split, mode == "ovl", interpret), layers, False)
                        args = (ops["q"], ops["x"], ops["w"], ops["kf"], ops["vf"], ops["bt"], ops["cl"])
                    else:
                        stage, prepare = make_stage(split, mode == "ovl", interpret, gemm_stream)
                        fn = build(mech, stage, layers, mode == "ovl")
                        args = (prepare(ops["q"]), ops["x"], ops["w"], ops["kf"], ops["vf"], ops["bt"], ops["cl"])
                    row[f"{mode}_ms_per_stage"] = round(wall_ms(fn, args) / stages, 4)
                    if mode == "ovl":
                        row["order"] = compiled_order(fn, args)[:200]
                        if hlo_dir and hasattr(fn, "lower"):
                            label = str(split).replace("/", "_").replace(":", "_")
                            Path(hlo_dir, f"{mech}_{label}_{gemm_stream}.txt").write_text(
                                fn.lower(*args).compile().as_text())
                        if trace and not interpret and mech != "fused":   # one kernel: nothing beside it
                            row.update(overlap_stats(trace_events(fn, args)))
                except Exception as e:  # a mechanism that fails to compile is a finding too
                    row[f"{mode}_error"] = repr(e)[:400]
            if "seq_ms_per_stage" in row and "ovl_ms_per_stage" in row:
                row["gain"] = round(row["seq_ms_per_stage"] / row["ovl_ms_per_stage"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def parse_splits(text: str) -> list[Split]:
    """'88/44,100/32x4:bk64:s2,all' -> [Split(88, 44), Split(100, 32, 4, block_k=64, num_stages=2),
    Split(None, None)] (see SPLIT_FORM); 'all' = the whole GPU, '88' = 88/88."""
    out = []
    for part in text.split(","):
        part = part.strip()

        def bad(what: str) -> ValueError:
            return ValueError(f"split {part!r}: {what}; expected {SPLIT_FORM}")

        def count(v: str, what: str) -> int | None:
            if v == "all":
                return None
            if not v.isdecimal() or int(v) < 1:
                raise bad(f"{what} {v!r} is not 'all' or an integer >= 1")
            return int(v)

        g, slash, a = part.partition("/")
        head, *opts = (a if slash else g).split(":")
        programs, x, per_sm = head.partition("x")
        options: dict[str, int] = {}
        for opt in opts:
            m = re.fullmatch(r"(bk|s|w)([0-9]+)", opt)
            if m is None or int(m[2]) < 1:
                raise bad(f"launch option {opt!r} is not bkN, sN or wN with N >= 1")
            if _OPTIONS[m[1]] in options:
                raise bad(f"launch option {m[1]!r} given twice")
            options[_OPTIONS[m[1]]] = int(m[2])
        if x and (not per_sm.isdecimal() or int(per_sm) < 1):
            raise bad(f"programs per SM {per_sm!r} is not an integer >= 1")
        out.append(Split(count(g, "GEMM programs"), count(programs, "attention programs"),
                         int(per_sm) if x else None, **options))
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--splits", default="88/44,all",
                   help="comma-separated GEMM/ATTN program counts ('all': the whole GPU; '88': 88/88), the "
                        "attention optionally with launch options: xPER_SM programs per SM, :bkN block_k, "
                        ":sN num_stages, :wN num_warps (e.g. 88/44,100/32x4:bk64:s2:w4,all)")
    p.add_argument("--mechanisms", default=",".join(MECHANISMS))
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--gemm-stream", type=int, default=0, help="the GEMM's stream in ovl (0: the main stream)")
    p.add_argument("--hlo-dir", default=None, help="write each ovl program's compiled HLO here")
    a = p.parse_args()
    mechs = tuple(m for m in a.mechanisms.split(",") if m)
    unknown = set(mechs) - set(MECHANISMS)
    if unknown:
        p.error(f"unknown mechanism(s) {sorted(unknown)}; choose from {MECHANISMS}")
    if a.hlo_dir:
        Path(a.hlo_dir).mkdir(parents=True, exist_ok=True)
    rows = measure(mechs, parse_splits(a.splits), a.layers, trace=not a.no_trace, gemm_stream=a.gemm_stream,
                   hlo_dir=a.hlo_dir)
    Path(a.out).write_text(json.dumps({**run_metadata("bench.overlap"), "shapes": {"gemm": [M, K, N], "decode": [REQS, CTX, HEADS,
                                       KV_HEADS, HEAD_DIM]}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
