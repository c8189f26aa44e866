"""Kernel benchmark: `python -m bench.kernels [--out FILE.json] [--budget-s S] [--sections ...]`.

On an H100/H200: checks every kernel against its jnp reference (bf16, both GEMM
backends), times them on Llama-3-8B shapes against ceilings measured in the same run
(GEMMs: the faster of XLA's dot and cuBLAS, also on a CUPTI timeline; memory-bound
kernels: the device copy bandwidth, and a copy of the same bytes timed the same way),
sweeps each kernel's program count over 1/8 ... 8/8 of the SMs ("sm_profile"), times
decode attention's launch configurations ("decode_configs", --decode-cases), and judges
the result against the kernel targets (bench.targets). `--smoke` runs the same code
interpreted on CPU with tiny shapes; `--plot FILE.json` draws performance vs SM share.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback
from typing import Any, Callable

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels as pk
from pallas_kernels import reference as ref
from bench import copy_bandwidth, library_gemm_ms, plot_sm_profile, rel_err, run_metadata, targets
from bench.shapes import GEMM_MS, LLAMA3_8B, PAGE, SMOKE, gemm_shapes
from bench.timing import cold_copies, copies_of, device_ms, timed_program, timing_mode

BF = jnp.bfloat16

SECTIONS = ("correctness", "ceilings", "gemm", "decode_attention", "memory_bound", "prefill_attention",
            "sm_profile", "decode_configs", "prefill_configs")
# Tokens of the memory-bound section: the engine's dense batches, then sizes where a
# copy of the same bytes streams at close to the bulk copy bandwidth (below ~64 MB both
# the kernels and the copy are launch-bound).
MEMORY_TS = (256, 512, 1024, 2048, 8192, 16384)
# Decode attention launches the decode_configs section times, as (block_k, warps, stages,
# context splits (None: automatic), programs per SM). Long contexts favour long blocks;
# the engine's short ones (128 x 640) several programs an SM, each waiting on memory less
# (bench/RESULTS.md, decode attention): the default is 64 keys, 4 warps, 2 stages, 4/SM.
DECODE_CONFIGS = [(128, 4, 3, None, 1), (128, 4, 4, None, 1), (128, 8, 4, None, 1), (256, 4, 2, None, 1),
                  (256, 4, 3, None, 1), (256, 8, 2, None, 1), (256, 8, 3, None, 1), (256, 8, 4, None, 1),
                  (128, 4, 3, 2, 1), (256, 8, 3, 2, 1), (512, 8, 2, None, 1), (512, 16, 2, None, 1),
                  (256, 4, 3, None, 2), (256, 4, 2, None, 4), (128, 4, 3, None, 2), (128, 4, 2, None, 4),
                  (64, 4, 2, None, 4), (64, 4, 3, None, 4), (64, 4, 2, None, 8), (64, 8, 2, None, 4),
                  (32, 4, 2, None, 8)]
DECODE_CASES = ((64, 4096), (128, 640))  # requests x context: the target's, the engine benchmark's
# Prefill attention launches the prefill_configs section times, as (query tokens a block,
# key block, warps, stages); a block holds block_q x Gp rows (Gp = 4 on Llama-3-8B).
PREFILL_CONFIGS = [(16, 64, 4, 2), (16, 64, 4, 3), (16, 128, 4, 2), (16, 32, 4, 2), (32, 64, 4, 2),
                   (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2),
                   (64, 32, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)]
# Requests of a prefill case as (cached tokens, new tokens); "decodes" adds that many decode
# rows at 1,280 cached tokens, as the engine passes them (position -1: they see no key).
PREFILL_CASES = {"engine_mixed": ([(240, 784), (0, 1024)], 240), "4x512_new": ([(0, 512)] * 4, 0),
                 "4x512_after_512": ([(512, 512)] * 4, 0), "4x512_after_1536": ([(1536, 512)] * 4, 0)}


def reference_in_chunks(q: jax.Array, k: jax.Array, v: jax.Array, seq: jax.Array, pos: jax.Array,
                        bt: jax.Array, ctx: jax.Array, *, scale: float, tokens: int = 256) -> jax.Array:
    """ref.paged_prefill_attention a slice of tokens at a time: whole, it holds every
    token's keys in f32 (16 GB at 2,048 tokens of 2,048 keys on Llama-3-8B heads)."""
    return jnp.concatenate([ref.paged_prefill_attention(q[i:i + tokens], k, v, seq[i:i + tokens],
                                                        pos[i:i + tokens], bt, ctx, scale=scale)
                            for i in range(0, q.shape[0], tokens)])


def copy_step(a: jax.Array) -> jax.Array:
    # The barrier keeps XLA from fusing a chain's adds into one pass (on GPU it is only
    # removed after fusion; the CPU compiler drops it first, see chain_kernels).
    return lax.optimization_barrier(a + jnp.ones((), a.dtype))


def chain_kernels(n: int, reps: int) -> int:
    """Kernels in the compiled copy chain that add over all n elements (want: reps).

    The program is the one device_ms times (its timing mode). A kernel is a fusion
    calling a computation with a full-size add whose root is not a one-element dependency
    patch (a dynamic-update-slice, computing only the element it needs); counted wherever
    called (GPU command buffers wrap fusions). Plus unfused adds.
    """
    mode = "patched" if timing_mode() == "patched" else "ordered"
    run, args = timed_program(copy_step, (jnp.zeros((n,), BF),), reps, mode=mode)
    hlo = run.lower(*args).compile().as_text()
    full_add = re.compile(rf"\[{n}\]\{{[^}}]*\}} add\(")
    comps = re.split(r"\n(?=\S)", hlo)  # computations start at column 0
    adders = {c.split()[0].lstrip("%") for c in comps
              if full_add.search(c) and "dynamic-update-slice(" not in c[c.find("ROOT"):].split("\n")[0]}
    fused = sum(m.group(1) in adders for m in re.finditer(r"calls=%?([\w.\-]+)", hlo))
    entry = next(c for c in comps if c.startswith("ENTRY"))
    return fused + len(full_add.findall(entry))


def copy_ceiling(nbytes: int, reps: int, repeats: int) -> dict[str, Any]:
    """Time of an `a + 1` chain moving nbytes (half read, half written), timed like the
    kernels; `one_kernel_per_step` False means XLA fused the chain and the time is low."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(0), (n,), BF)
    ms = device_ms(copy_step, x, reps=reps, repeats=repeats)
    k = chain_kernels(n, reps)
    return {"bytes": 4 * n, "ms": ms, "gbps": 4 * n / ms / 1e6, "chain_kernels": k, "reps": reps,
            "one_kernel_per_step": k == reps}


class Bench:
    def __init__(self, smoke: bool, budget_s: float, out_path: str, sections: tuple[str, ...] = SECTIONS,
                 gemm_ms: tuple[int, ...] = GEMM_MS, gemm_backends: tuple[str, ...] = ("mosaic", "triton"),
                 memory_ts: tuple[int, ...] = MEMORY_TS,
                 decode_cases: tuple[tuple[int, int], ...] = DECODE_CASES) -> None:
        self.smoke, self.interp = smoke, smoke
        self.sections = sections
        self.gemm_ms = gemm_ms
        self.memory_ts = memory_ts
        self.decode_cases = decode_cases
        self.deadline = time.time() + budget_s
        self.out_path = out_path
        self.res: dict[str, Any] = {"meta": run_metadata(), "errors": {}}
        seed = int(time.time())  # fresh inputs every run (recorded for a rerun)
        self.key, self.np_rng = jax.random.key(seed), np.random.default_rng(seed)
        self.res["meta"]["seed"] = seed
        self.sms = pk._common.num_sms() if not smoke else 8
        # Smoke runs leave Mosaic GPU to the unit tests: its CPU interpreter is slow.
        self.backends = ("triton",) if smoke else gemm_backends
        self.m = SMOKE if smoke else LLAMA3_8B

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
    def paged(self, n: int, ctx: int, ps: int = PAGE) -> dict[str, Any]:
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
        rows = []
        for mm in ms:
            for name, (kd, nd) in gemm_shapes(self.m).items():
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
        Slope timing runs the library first and ours later, minutes apart, and the GPU's
        clocks drift between them by up to 10-20% (bench/RESULTS.md, "Answered questions")."""
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
        (at 1-64 MB both the kernels and the copy are launch-bound)."""
        rows = []
        for t in (self.memory_ts if not self.smoke else (32,)):
            for name, (mk, args, nbytes, thread) in self.memory_cases(t).items():
                ms_ = self.t(mk(None), *args, thread=thread)
                same = copy_ceiling(nbytes, reps=2 if self.smoke else 10, repeats=1 if self.smoke else 5)
                rows.append({"op": name, "t": t, "ms": ms_, "gbps": nbytes / ms_ / 1e6,
                             "vs_copy": nbytes / ms_ / 1e6 / copy_gbps,
                             "copy_same_size_ms": same["ms"], "vs_copy_same_size": same["ms"] / ms_,
                             "copy_one_kernel_per_step": same["one_kernel_per_step"]})
                print(rows[-1], flush=True)
        return rows

    def prefill_case(self, reqs: list[tuple[int, int]], decodes: int = 0) -> tuple[tuple, float]:
        """Arguments of paged_prefill_attention for requests of (cached, new) tokens plus
        `decodes` decode rows (position -1, as the engine passes them), and the causal FLOPs."""
        m, ctx_dec = self.m, 1280 if not self.smoke else 8
        ctxs = [c + n for c, n in reqs] + [ctx_dec] * decodes
        g = self.paged(len(ctxs), max(ctxs))
        seq = np.concatenate([np.full(n, i) for i, (_, n) in enumerate(reqs)] + [np.arange(len(reqs), len(ctxs))])
        pos = np.concatenate([np.arange(c, c + n) for c, n in reqs] + [np.full(decodes, -1)])
        q = self.rand(len(seq), m["H"], m["D"])
        flops = 4 * m["H"] * m["D"] * float(np.sum(pos + 1))
        return (q, g["k"], g["v"], jnp.asarray(seq, jnp.int32), jnp.asarray(pos, jnp.int32), g["bt"],
                jnp.asarray(ctxs, jnp.int32)), flops

    def prefill(self) -> list[dict[str, Any]]:
        """Chunks of `new` tokens after `cached` ones, 4 requests: causal attention TFLOP/s."""
        rows = []
        for cached, new in (((0, 512), (512, 512), (1536, 512)) if not self.smoke else ((8, 8),)):
            args, flops = self.prefill_case([(cached, new)] * 4)
            fn = functools.partial(pk.paged_prefill_attention, scale=0.088, interpret=self.interp)
            ms_ = self.t(fn, *args)
            rows.append({"requests": 4, "cached": cached, "new": new, "ms": ms_, "tflops": flops / ms_ / 1e9})
            print(rows[-1], flush=True)
        return rows

    def prefill_configs(self) -> list[dict[str, Any]]:
        """Each of PREFILL_CONFIGS on each of PREFILL_CASES: ms and TFLOP/s, checked against
        the reference (a launch that fails or computes wrong is a row with its error)."""
        rows: list[dict[str, Any]] = []
        cases = PREFILL_CASES if not self.smoke else {"smoke": ([(3, 5), (0, 9)], 2)}
        for name, (reqs, decodes) in cases.items():
            args, flops = self.prefill_case(reqs, decodes)
            want = reference_in_chunks(*args, scale=0.088)
            for bq, bk, nw, ns in PREFILL_CONFIGS:
                if time.time() > self.deadline:
                    return rows
                row: dict[str, Any] = {"case": name, "block_q": bq, "block_k": bk, "num_warps": nw, "num_stages": ns}
                fn = functools.partial(pk.paged_prefill_attention, scale=0.088, interpret=self.interp, block_q=bq,
                                       block_k=bk, num_warps=nw, num_stages=ns)
                try:
                    err = rel_err(fn(*args), want)
                    if not err < 2e-2:
                        raise ValueError(f"relative error {err:.3g} against the reference")
                    ms_ = self.t(fn, *args)
                except Exception as exc:  # noqa: BLE001 - a launch that fails is a result too
                    rows.append({**row, "error": str(exc)[:300]})
                    continue
                rows.append({**row, "ms": ms_, "tflops": flops / ms_ / 1e9})
                print(rows[-1], flush=True)
        return rows

    def decode_configs(self, copy_gbps: float) -> list[dict[str, Any]]:
        """Each of DECODE_CONFIGS on each of the decode cases: GB/s and its share of the
        copy bandwidth; a launch that fails is a row too (with its error)."""
        rows: list[dict[str, Any]] = []
        for n, ctx in self.decode_cases:
            mk, args, nbytes = self.decode_case(n, ctx)
            for bk, nw, ns, splits, pps in DECODE_CONFIGS:
                row: dict[str, Any] = {"n": n, "ctx": ctx, "block_k": bk, "num_warps": nw, "num_stages": ns,
                                       "num_splits": splits, "programs_per_sm": pps}
                fn = functools.partial(pk.paged_decode_attention, scale=0.088, interpret=self.interp, block_k=bk,
                                       num_warps=nw, num_stages=ns, num_splits=splits, programs_per_sm=pps)
                try:
                    ms_ = self.t(fn, *args)
                except Exception as exc:  # noqa: BLE001 - a launch that does not compile is a result too
                    rows.append({**row, "error": str(exc)[:300]})
                    continue
                rows.append({**row, "ms": ms_, "gbps": nbytes / ms_ / 1e6, "vs_copy": nbytes / ms_ / 1e6 / copy_gbps})
                print(rows[-1], flush=True)
        return rows

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
        self.section("prefill_configs", self.prefill_configs)
        if not self.smoke:
            self.section("decode_configs", lambda: self.decode_configs(copy))
            self.res["targets"] = targets.check([self.res])  # the kernel targets, pass or fail
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
    ap.add_argument("--decode-cases", default=",".join(f"{n}x{c}" for n, c in DECODE_CASES),
                    help="requests x context of the decode_configs section (comma-separated)")
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
          memory_ts=tuple(int(t) for t in a.memory_ts.split(",")),
          decode_cases=tuple(tuple(int(v) for v in c.split("x")) for c in a.decode_cases.split(","))).run()


if __name__ == "__main__":
    main()
