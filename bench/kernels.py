"""Kernel benchmark: `python -m bench.kernels [--out FILE.json] [--budget-s S]`.

On an H100/H200: checks every kernel against its jnp reference (bf16, both GEMM
backends), times them on Llama-3-8B shapes against ceilings measured in the same run,
and sweeps each kernel's program count over 1/8 ... 8/8 of the SMs (the profile the
auto-search reads, under "sm_profile"). `--smoke` runs the same code interpreted on
CPU with tiny shapes; `--plot FILE.json` draws performance vs SM share to a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import reference as ref
from bench import copy_bandwidth, library_gemm_ms, plot_sm_profile, rel_err, run_metadata, targets
from bench.timing import cold_copies, copies_of, device_ms

BF = jnp.bfloat16
LLAMA8B = dict(E=4096, H=32, K=8, D=128, F=14336)


SECTIONS = ("correctness", "ceilings", "gemm", "decode_attention", "memory_bound", "prefill_attention",
            "sm_profile", "decode_configs")
GEMM_MS = (128, 256, 512, 1024, 2048)  # dense batch sizes of the gemm section
# Tokens of the memory-bound section: the engine's dense batches, then sizes where a
# copy of the same bytes streams at close to the bulk copy bandwidth (below ~64 MB both
# the kernels and the copy are launch-bound: bench.memory_sweep).
MEMORY_TS = (256, 512, 1024, 2048, 8192, 16384)


class Bench:
    def __init__(self, smoke: bool, budget_s: float, out_path: str, sections: tuple[str, ...] = SECTIONS,
                 gemm_ms: tuple[int, ...] = GEMM_MS, gemm_backends: tuple[str, ...] = ("mosaic", "triton"),
                 memory_ts: tuple[int, ...] = MEMORY_TS) -> None:
        self.smoke, self.interp = smoke, smoke
        self.sections = sections
        self.gemm_ms = gemm_ms
        self.memory_ts = memory_ts
        self.deadline = time.time() + budget_s
        self.out_path = out_path
        self.res: dict[str, Any] = {"meta": run_metadata(), "errors": {}}
        seed = int(time.time())  # fresh inputs every run (recorded for a rerun)
        self.key, self.np_rng = jax.random.key(seed), np.random.default_rng(seed)
        self.res["meta"]["seed"] = seed
        self.sms = pk._common.num_sms() if not smoke else 8
        # Smoke runs leave Mosaic GPU to the unit tests: its CPU interpreter is slow.
        self.backends = ("triton",) if smoke else gemm_backends
        self.m = dict(E=64, H=4, K=2, D=32, F=128) if smoke else LLAMA8B

    def rand(self, *shape: int, dtype=BF) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return jax.random.normal(sub, shape, jnp.float32).astype(dtype)

    def save(self) -> None:
        with open(self.out_path, "w") as f:
            json.dump(self.res, f, indent=1, default=float)

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        if name not in self.sections:
            return
        if time.time() > self.deadline:
            self.res["errors"][name] = "skipped: time budget spent"
            return
        t0 = time.time()
        try:
            self.res[name] = fn()
        except Exception:  # noqa: BLE001 - one broken kernel must not lose the others' numbers
            self.res["errors"][name] = traceback.format_exc()[-3000:]
        print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
        self.save()

    def t(self, fn: Callable[..., Any], *args: Any, thread: int = 0, rotate: tuple[int, ...] = ()) -> float:
        """Device ms per call (see bench.timing.device_ms); fn is a plain, un-jitted function."""
        return device_ms(fn, *args, reps=2 if self.smoke else 10, thread=thread,
                         repeats=1 if self.smoke else 5, rotate=rotate)

    def cold(self, *weights: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
        """Each weight as copies that together exceed L2 (rotated through, as in a model)."""
        n = 1 if self.smoke else cold_copies(sum(w.nbytes for w in weights))
        return tuple(copies_of(w, n) for w in weights)

    # ---- inputs -------------------------------------------------------------------
    def paged(self, n: int, ctx: int, ps: int = 16) -> dict[str, Any]:
        m = self.m
        w = -(-ctx // ps)
        pages = n * w + 1
        perm = self.np_rng.permutation(np.arange(1, pages))  # shuffled page tables
        return dict(k=self.rand(pages, ps, m["K"], m["D"]), v=self.rand(pages, ps, m["K"], m["D"]),
                    bt=jnp.asarray(perm.reshape(n, w), jnp.int32))

    # ---- sections -----------------------------------------------------------------
    def correctness(self) -> dict[str, Any]:
        m, out = self.m, {}
        t, e, f = 256 if not self.smoke else 24, m["E"], m["F"]
        x, w, u, b, r = self.rand(t, e), self.rand(e, f) / 30, self.rand(e, f) / 30, self.rand(f), self.rand(t, f)
        for backend in self.backends:
            for p in (1, 7, None):
                kw = dict(num_programs=p, interpret=self.interp, backend=backend)
                out[f"gemm_{backend}_p{p}"] = rel_err(pk.gemm(x, w, **kw), ref.gemm(x, w))
                out[f"gemm_bias_res_{backend}_p{p}"] = rel_err(pk.gemm(x, w, bias=b, residual=r, **kw),
                                                               ref.gemm(x, w, bias=b, residual=r))
                out[f"gemm_silu_{backend}_p{p}"] = rel_err(pk.gemm_silu_mul(x, w, u, **kw),
                                                           ref.gemm_silu_mul(x, w, u))
        g = self.paged(8, 300)
        ctx = jnp.array([1, 17, 300, 0, 255, 64, 129, 299], jnp.int32)
        q = self.rand(8, m["H"], m["D"])
        for p in (1, 7, None):
            o = pk.paged_decode_attention(q, g["k"], g["v"], g["bt"], ctx, scale=0.088, num_programs=p,
                                          interpret=self.interp)
            out[f"decode_p{p}"] = rel_err(o, ref.paged_decode_attention(q, g["k"], g["v"], g["bt"], ctx, scale=0.088))
        seqs, pos = [], []
        for s, (c, n) in enumerate([(0, 70), (100, 33), (299, 1), (5, 1)]):
            seqs += [s] * n
            pos += list(range(c, c + n))
        ts, ps_ = jnp.array(seqs, jnp.int32), jnp.array(pos, jnp.int32)
        cl = jnp.array([70, 133, 300, 6, 0, 0, 0, 0], jnp.int32)
        qp = self.rand(len(seqs), m["H"], m["D"])
        for p in (1, 7, None):
            o = pk.paged_prefill_attention(qp, g["k"], g["v"], ts, ps_, g["bt"], cl, scale=0.088,
                                           num_programs=p, interpret=self.interp)
            out[f"prefill_p{p}"] = rel_err(o, ref.paged_prefill_attention(qp, g["k"], g["v"], ts, ps_, g["bt"], cl, scale=0.088))
        xe, re_, we = self.rand(t, e), self.rand(t, e), self.rand(e)
        y, h = pk.rms_norm(xe, we, eps=1e-5, residual=re_, num_programs=7, interpret=self.interp)
        ry, rh = ref.rms_norm(xe, we, eps=1e-5, residual=re_)
        out["rms_norm_res"] = max(rel_err(y, ry), rel_err(h, rh))
        qr, pr = self.rand(t, m["H"], m["D"]), jnp.arange(t, dtype=jnp.int32) * 37
        sc = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        out["rope_llama3"] = rel_err(pk.apply_rope(qr, pr, theta=5e5, scaling=sc, num_programs=7, interpret=self.interp),
                                     ref.apply_rope(qr, pr, theta=5e5, scaling=sc))
        ids = jnp.asarray(np.random.default_rng(1).permutation(np.arange(1, g["k"].shape[0]))[:9], jnp.int32)
        kk = jnp.stack([g["k"], g["v"]])
        out["gather_pages"] = rel_err(pk.gather_pages(kk, ids, num_programs=7, interpret=self.interp), ref.gather_pages(kk, ids))
        buf = self.rand(*ref.gather_pages(kk, ids).shape)
        out["scatter_pages"] = rel_err(pk.scatter_pages(kk, ids, buf, num_programs=7, interpret=self.interp),
                                       ref.scatter_pages(kk, ids, buf))
        kn, vn = self.rand(t, m["K"], m["D"]), self.rand(t, m["K"], m["D"])
        slots = jnp.asarray(np.random.default_rng(2).permutation(np.arange(16, g["k"].shape[0] * 16))[:t], jnp.int32)
        ko, vo = pk.write_kv(g["k"], g["v"], kn, vn, slots, num_programs=7, interpret=self.interp)
        rk, rv = ref.write_kv(g["k"], g["v"], kn, vn, slots)
        out["write_kv"] = max(rel_err(ko, rk), rel_err(vo, rv))
        out["all_pass_1e-2"] = all(v < 1e-2 for v in out.values())
        return out

    def gemms(self, ms: tuple[int, ...]) -> list[dict[str, Any]]:
        m, rows = self.m, []
        e, f, h, k, d = m["E"], m["F"], m["H"], m["K"], m["D"]
        shapes = {"qkv": (e, (h + 2 * k) * d), "o_res": (h * d, e), "gate_up_silu": (e, f), "down_res": (f, e)}
        for mm in ms:
            for name, (kd, nd) in shapes.items():
                if time.time() > self.deadline:
                    return rows
                x, w = self.rand(mm, kd), self.rand(kd, nd) / 30
                silu = name == "gate_up_silu"
                flops = 2 * mm * kd * nd * (2 if silu else 1)
                lib = library_gemm_ms(mm, nd * (2 if silu else 1), kd) if not self.smoke else {"best_ms": float("nan")}
                row = {"m": mm, "n": nd, "k": kd, "op": name, "library": lib}
                extra = self.rand(kd, nd) / 30 if silu else None
                res = self.rand(mm, nd) if name.endswith("_res") else None
                for backend in self.backends:
                    if silu:
                        fn = (lambda a, b, c, bk=backend: pk.gemm_silu_mul(a, b, c, backend=bk, interpret=self.interp))
                        ms_ = self.t(fn, x, *self.cold(w, extra), rotate=(1, 2))
                    else:
                        fn = (lambda a, b, r, bk=backend: pk.gemm(a, b, residual=r, backend=bk, interpret=self.interp))
                        ms_ = self.t(fn, x, *self.cold(w), res, rotate=(1,))
                    row[backend] = {"ms": ms_, "tflops": flops / ms_ / 1e9, "vs_library": lib["best_ms"] / ms_}
                row["library"]["tflops"] = flops / lib["best_ms"] / 1e9
                rows.append(row)
                print(row, flush=True)
        if not self.smoke and "mosaic" in self.backends and rows:
            self.gemm_timeline(rows)
        return rows

    def gemm_timeline(self, rows: list[dict[str, Any]]) -> None:
        """Adds each shape's GPU time per call from CUPTI's kernel records (bench.timeline:
        working clocks, every variant's programs traced back to back) to its Mosaic row.
        Slope timing runs the library first and ours later, minutes apart; at 0.3-0.7 ms
        a call the GPU's clocks had drifted 10-20% between them (gate/up at M = 2048:
        754 us slope against 618 us traced: bench/results/kernels_gemm_s10a_h200.json and
        timeline_s10_h200.json)."""
        from bench import timeline  # noqa: PLC0415

        cases = [(r["op"], r["m"]) for r in rows]
        table = timeline.table(timeline.measure(cases, reps=20, runs=5))
        for r in rows:
            t = table[f"{r['op']}:{r['m']}"]
            r["mosaic"]["timeline"] = t
            print(f"[timeline] {r['op']}:{r['m']} ours {t['ours_span_us']:.1f} us/call, "
                  f"library/ours span {t['span_vs_library']:.3f} busy {t['busy_vs_library']:.3f}", flush=True)

    def decode_case(self, n: int, ctx: int) -> tuple[Callable[..., Any], tuple, int]:
        g, m = self.paged(n, ctx), self.m
        q = self.rand(n, m["H"], m["D"])
        cl = jnp.full((n,), ctx, jnp.int32)
        nbytes = 2 * n * ctx * m["K"] * m["D"] * 2
        return (lambda p: (lambda q_, k_, v_, bt_, c_: pk.paged_decode_attention(
            q_, k_, v_, bt_, c_, scale=0.088, num_programs=p, interpret=self.interp)),
            (q, g["k"], g["v"], g["bt"], cl), nbytes)

    def decode(self, copy_gbps: float) -> list[dict[str, Any]]:
        rows = []
        for ctx in ((512, 1024, 2048, 4096) if not self.smoke else (40,)):
            n = 64 if not self.smoke else 3
            mk, args, nbytes = self.decode_case(n, ctx)
            ms_ = self.t(mk(None), *args)
            rows.append({"n": n, "ctx": ctx, "ms": ms_, "gbps": nbytes / ms_ / 1e6,
                         "vs_copy": nbytes / ms_ / 1e6 / copy_gbps})
            print(rows[-1], flush=True)
        return rows

    def memory_cases(self, t: int) -> dict[str, tuple[Callable[[Any], Callable], tuple, int, int]]:
        """name -> (make(programs) -> fn, args, bytes moved per call, chain threading)."""
        m, it = self.m, self.interp
        e, h, k, d = m["E"], m["H"], m["K"], m["D"]
        x, r, w = self.rand(t, e), self.rand(t, e), self.rand(e)
        q, pos = self.rand(t, h, d), jnp.arange(t, dtype=jnp.int32)
        g = self.paged(1, t + 16)  # a cache just big enough for the t new tokens
        kn = self.rand(t, k, d)
        slots = jnp.arange(16, 16 + t, dtype=jnp.int32)
        layers = 32 if not self.smoke else 2
        cache = self.rand(layers, 64 if not self.smoke else 8, 16, k, d)
        ids = jnp.arange(1, cache.shape[1] // 2, dtype=jnp.int32)
        page_bytes = 2 * layers * len(ids) * 16 * k * d * 2
        return {
            "rms_norm_res": (lambda p: (lambda a, b, c: pk.rms_norm(a, c, eps=1e-5, residual=b, num_programs=p, interpret=it)),
                             (x, r, w), 4 * t * e * 2, 0),  # read x, r; write y, h
            "rope": (lambda p: (lambda a, b: pk.apply_rope(a, b, theta=5e5, num_programs=p, interpret=it)),
                     (q, pos), 2 * t * h * d * 2, 0),
            "write_kv": (lambda p: (lambda kc, vc, a, s: pk.write_kv(kc, vc, a, a, s, num_programs=p, interpret=it)),
                         (g["k"], g["v"], kn, slots), 4 * t * k * d * 2, 2),
            # offload round trip: gather a request's pages, scatter them back
            "gather_scatter_pages": (lambda p: (lambda c, i: pk.scatter_pages(
                c, i, pk.gather_pages(c, i, num_programs=p, interpret=it), num_programs=p, interpret=it)),
                (cache, ids), 2 * page_bytes, 1),
        }

    def memory(self, copy_gbps: float) -> list[dict[str, Any]]:
        """GB/s vs the large-buffer copy and vs a copy of the same bytes timed the same way
        (at 1-64 MB both the kernels and the copy are launch-bound: bench.memory_sweep)."""
        from bench.memory_sweep import copy_ceiling

        rows = []
        timing = dict(reps=2 if self.smoke else 10, repeats=1 if self.smoke else 5)
        for t in (self.memory_ts if not self.smoke else (32,)):
            for name, (mk, args, nbytes, thread) in self.memory_cases(t).items():
                ms_ = self.t(mk(None), *args, thread=thread)
                same = copy_ceiling(nbytes, timing)
                rows.append({"op": name, "t": t, "ms": ms_, "gbps": nbytes / ms_ / 1e6,
                             "vs_copy": nbytes / ms_ / 1e6 / copy_gbps,
                             "copy_same_size_ms": same["ms"], "vs_copy_same_size": same["ms"] / ms_,
                             "copy_one_kernel_per_step": same["one_kernel_per_step"]})
                print(rows[-1], flush=True)
        return rows

    def prefill(self) -> list[dict[str, Any]]:
        """Chunks of `new` tokens after `cached` ones, 4 requests: causal attention TFLOP/s."""
        m, rows = self.m, []
        for cached, new in (((0, 512), (512, 512), (1536, 512)) if not self.smoke else ((8, 8),)):
            n = 4
            g = self.paged(n, cached + new)
            seq = jnp.repeat(jnp.arange(n, dtype=jnp.int32), new)
            pos = jnp.tile(jnp.arange(cached, cached + new, dtype=jnp.int32), n)
            cl = jnp.full((n,), cached + new, jnp.int32)
            q = self.rand(n * new, m["H"], m["D"])
            flops = 4 * m["H"] * m["D"] * float(jnp.sum(pos + 1))
            fn = lambda q_, k_, v_, s_, p_, bt_, c_: pk.paged_prefill_attention(
                q_, k_, v_, s_, p_, bt_, c_, scale=0.088, interpret=self.interp)
            ms_ = self.t(fn, q, g["k"], g["v"], seq, pos, g["bt"], cl)
            rows.append({"requests": n, "cached": cached, "new": new, "ms": ms_, "tflops": flops / ms_ / 1e9})
            print(rows[-1], flush=True)
        return rows

    def decode_configs(self, copy_gbps: float) -> list[dict[str, Any]]:
        """Block size / warps / stages / splits of decode attention at a long context."""
        from bench.decode_sweep import sweep_configs

        g, m = self.paged(64, 4096), self.m
        q, cl = self.rand(64, m["H"], m["D"]), jnp.full((64,), 4096, jnp.int32)
        nbytes = 2 * 64 * 4096 * m["K"] * m["D"] * 2
        return sweep_configs((q, g["k"], g["v"], g["bt"], cl), nbytes, copy_gbps, 0.088, self.t)

    def sweep(self) -> dict[str, Any]:
        """Time vs program count (1/8 .. 8/8 of the SMs) for one representative shape each."""
        m, prof = self.m, {}
        progs = sorted({max(1, round(self.sms * i / 8)) for i in range(1, 9)})
        mm = 1024 if not self.smoke else 24
        x, wq = self.rand(mm, m["E"]), self.rand(m["E"], m["E"]) / 30
        wg, wu = self.rand(m["E"], m["F"]) / 30, self.rand(m["E"], m["F"]) / 30
        cases = {
            "gemm_mosaic": (lambda p: (lambda a, b: pk.gemm(a, b, num_programs=p, backend="mosaic", interpret=self.interp)), (x, *self.cold(wq)), (1,)),
            "gemm_triton": (lambda p: (lambda a, b: pk.gemm(a, b, num_programs=p, backend="triton", interpret=self.interp)), (x, *self.cold(wq)), (1,)),
            "gemm_silu_mosaic": (lambda p: (lambda a, b, c: pk.gemm_silu_mul(a, b, c, num_programs=p, backend="mosaic", interpret=self.interp)), (x, *self.cold(wg, wu)), (1, 2)),
        }
        mk, args, _ = self.decode_case(64 if not self.smoke else 3, 2048 if not self.smoke else 40)
        cases["decode_attention"] = (mk, args, ())
        cases = {k: (v[0], v[1], 0, v[2]) for k, v in cases.items()}
        cases.update({k: (v[0], v[1], v[3], ()) for k, v in self.memory_cases(mm).items()})
        for name, (mk, args, thread, rotate) in cases.items():
            if time.time() > self.deadline:
                break
            try:
                times = [self.t(mk(p), *args, thread=thread, rotate=rotate) for p in progs]
                prof[name] = {"programs": progs, "ms": times, "rel_perf": [min(times) / t for t in times]}
            except Exception:  # noqa: BLE001
                prof[name] = {"error": traceback.format_exc()[-2000:]}
            print(name, prof[name], flush=True)
        return prof

    def run(self) -> None:
        self.section("correctness", self.correctness)
        if not self.smoke:
            self.section("ceilings", copy_bandwidth)
        copy = self.res.get("ceilings", {}).get("copy_gbps", float("nan"))
        self.section("gemm", lambda: self.gemms(self.gemm_ms if not self.smoke else (24,)))
        self.section("decode_attention", lambda: self.decode(copy))
        self.section("memory_bound", lambda: self.memory(copy))
        self.section("prefill_attention", self.prefill)
        self.section("sm_profile", self.sweep)
        if not self.smoke:
            self.section("decode_configs", lambda: self.decode_configs(copy))
            self.res["targets"] = targets.check([self.res])  # issue #4's targets, pass or fail
            for line in targets.report(self.res["targets"]):
                print(line, flush=True)
            self.save()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="kernels_results.json")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    ap.add_argument("--plot", metavar="JSON", help="only draw JSON's SM profile to --png")
    ap.add_argument("--png", default="kernels_sm_profile.png")
    ap.add_argument("--gemm-backends", default="mosaic,triton",
                    help="GEMM backends to time (comma-separated; smoke runs time triton only)")
    ap.add_argument("--gemm-ms", default=",".join(map(str, GEMM_MS)),
                    help="dense batch sizes M of the gemm section (comma-separated)")
    ap.add_argument("--memory-ts", default=",".join(map(str, MEMORY_TS)),
                    help="token counts T of the memory_bound section (comma-separated)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="sections to run (comma-separated), of " + ",".join(SECTIONS))
    a = ap.parse_args(argv)
    if a.plot:
        plot_sm_profile(a.plot, a.png)
        return
    sections = tuple(a.sections.split(","))
    if {"decode_attention", "memory_bound", "decode_configs"} & set(sections):
        sections += ("ceilings",)  # their ratios are to the copy bandwidth measured here
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown --sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    Bench(a.smoke, a.budget_s, a.out, sections, gemm_ms=tuple(int(m) for m in a.gemm_ms.split(",")),
          gemm_backends=tuple(a.gemm_backends.split(",")),
          memory_ts=tuple(int(t) for t in a.memory_ts.split(","))).run()


if __name__ == "__main__":
    main()
