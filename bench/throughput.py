"""Offline serving throughput of the whole engine, measured against NanoFlow's yardstick.

    python -m bench.throughput --model llama-3-8b --weights random --num-prompts 512 \
        --input-len 512 --output-len 512 --max-num-batched-tokens 2048 --out bench/results/x.json
    python -m bench.throughput --dataset splitwise-conv --max-model-len 4096 --pipeline all --plot x.png

Flags follow `vllm bench throughput` where they overlap (--num-prompts, --input-len,
--output-len, --dataset-name, --dataset-path, --max-num-seqs, --max-num-batched-tokens,
--max-model-len, --seed, --output-json). Workloads (bench/datasets.py): constant lengths,
or lengths drawn from the shape of a public trace (Splitwise, LMSYS-Chat-1M, ShareGPT);
prompts are random token ids, and each request generates its own length (ignore_eos).

NanoFlow's optimal throughput per GPU is GEMM peak / (2 x params) tokens/s: every
token (prompt or generated) must at least pass through every weight once. The peak is
measured in the same run (the faster of XLA's dot and, where installed, cuBLAS via
torch on an 8192^3 bf16 product), so the ratio is honest on whatever card ran it.

Timing: start-up (weights, KV pool and, on a GPU, every bucket's compile) is timed apart
from the measured generate, and compile time is reported per phase. Each `LLMEngine.step()`
call's host wall time is recorded: with async scheduling a step dispatches iteration i+1
and then waits for iteration i, so a device-bound run's step time is the device's time
per iteration. Device idle time between iterations needs device timestamps, which timing
from the host would serialize: `--profile-steps` traces windows of steps with jax.profiler
and reports it, with each operation of a mixed and a pure-decode iteration against its
FLOP/byte floor (bench.iteration; JSON fields `device_idle`, `iteration_profile`, and a PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench import copy_bandwidth, datasets, iteration, library_gemm_ms, nanoflow_env, print_and_write, pyplot, run_metadata
from nanoflow_jax.config import KERNEL_SETS, KV_CACHE_DTYPE_CHOICES, PIPELINES
from nanoflow_jax.engine.config import EngineConfig

ALL_PIPELINES = "all"
WARMUP_PROMPTS = 8
IDLE_NOT_MEASURED = ("measured only with --profile-steps on a GPU (kernel records of traced windows); "
                     "timing the device from the host would serialize the asynchronous pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--weights", default="random", choices=["auto", "random"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--dataset", "--dataset-name", dest="dataset", default=datasets.CONSTANT,
                   help=f"request lengths: {datasets.CONSTANT} (constant --input-len / --output-len) or a "
                        f"built-in trace shape: {', '.join(datasets.dataset_names()[1:])}")
    p.add_argument("--dataset-path", default=None,
                   help="a CSV length trace (ContextTokens,GeneratedTokens or input_len,output_len columns) "
                        "to sample requests from, instead of --dataset")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (--dataset random)")
    p.add_argument("--output-len", type=int, default=512, help="generated tokens (--dataset random)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="caps every request (prompt first, then output); default: the longest request")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--kv-memory-fraction", type=float, default=None)
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS),
                   help="auto: Pallas kernels on a GPU, XLA ops on CPU; hybrid: Pallas, but XLA's GEMMs")
    p.add_argument("--token-buckets", default=None, help="comma-separated dense-batch sizes to compile")
    p.add_argument("--pipeline", default="sequential", choices=[*PIPELINES, ALL_PIPELINES],
                   help="sequential | nanobatch | nanoflow (EngineConfig.pipeline); all: each in turn, "
                        "with the speed-ups over sequential")
    p.add_argument("--async-scheduling", type=int, choices=[0, 1], default=1)
    p.add_argument("--precompile", default="auto", choices=["auto", "0", "1"],
                   help="compile every bucket at start-up (auto: on a GPU; on CPU buckets compile when first "
                        "needed, which may fall inside the timed run: 1 keeps it out)")
    defaults = EngineConfig()
    p.add_argument("--fuse-qkv", type=int, choices=[0, 1], default=int(defaults.fuse_qkv),
                   help="one QKV GEMM instead of three (0: three, the ablation)")
    p.add_argument("--decode-only-steps", type=int, choices=[0, 1], default=int(defaults.decode_only_steps),
                   help="Pallas: pure-decode batches skip the prefill attention kernel (EngineConfig.decode_only_steps)")
    p.add_argument("--fuse-rope-kv", type=int, choices=[0, 1], default=int(defaults.fuse_rope_kv),
                   help="Pallas: K's RoPE inside the KV-cache write (EngineConfig.fuse_rope_kv)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=defaults.enable_prefix_caching,
                   help="EngineConfig.enable_prefix_caching (the cache is reset after the warm-up, whose "
                        "prompts the timed run repeats)")
    p.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=list(KV_CACHE_DTYPE_CHOICES),
                   help="EngineConfig.kv_cache_dtype: auto (the weights') or fp8 (e4m3: twice the pages, half "
                        "the bytes for decode attention)")
    p.add_argument("--kv-offload-host-gb", type=float, default=defaults.kv_offload_host_gb,
                   help="EngineConfig.kv_offload_host_gb: finished requests' KV pages go to an LRU of this much "
                        "host memory (0: off); measures the offload's cost on work that never reuses them")
    p.add_argument("--kv-offload-pages-per-step", type=int, default=defaults.kv_offload_pages_per_step,
                   help="EngineConfig.kv_offload_pages_per_step: pages each step copies to host memory inside "
                        "its program (default: 16 MiB of pages on a GPU, none on CPU; 0: a gather before the step, the ablation)")
    p.add_argument("--gemm-peak-tflops", type=float, default=None,
                   help="skip measuring the GEMM peak and use this (TFLOP/s)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="devices the model is split over; per-device numbers and %% of optimal divide by it")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="JAX's persistent compilation cache (EngineConfig.compilation_cache_dir); a second run "
                        "with the same folder measures the warm start-up")
    p.add_argument("--profile-steps", default=None,
                   help="trace these windows of engine steps, START:COUNT[,START:COUNT] (GPU): device idle between "
                        "iterations and each operation against its floor (bench.iteration)")
    p.add_argument("--profile-dir", default=None,
                   help="where the traced windows go (default: beside --out, else a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--output-json", dest="out", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None,
                   help="write a PNG here: length histograms, tokens/s by pipeline, step time over the run")
    args = p.parse_args(argv)
    if args.dataset_path is None:
        try:
            args.dataset = datasets.resolve(args.dataset)
        except ValueError as e:
            p.error(str(e))
    elif not Path(args.dataset_path).is_file():
        p.error(f"--dataset-path {args.dataset_path}: no such file")
    if args.num_prompts < 1:
        p.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    try:
        args.profile_windows = iteration.parse_windows(args.profile_steps)
    except ValueError as e:
        p.error(str(e))
    if args.profile_windows and args.pipeline != "sequential":
        p.error("--profile-steps attributes kernels of one stream: use it with --pipeline sequential")
    return args


# Datasheet dense bf16 tensor-core peaks (TFLOP/s), the yardstick NanoFlow's 68.5% / 78.5%
# of optimal were stated against; longest name first (an "H100 PCIe" is not an SXM H100).
SPEC_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def spec_peak_tflops(device: str) -> float | None:
    """The datasheet bf16 peak of a device named like "NVIDIA H200" (None: not listed)."""
    return next((v for k, v in sorted(SPEC_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if k.lower() in device.lower()), None)


def measure_gemm_peak(n: int = 8192) -> dict[str, float]:
    """TFLOP/s of a bf16 n^3 product through XLA and (if installed) cuBLAS via torch."""
    times = library_gemm_ms(n, n, n)
    flops = 2 * n ** 3
    return {f"{lib}_tflops": flops / times[f"{lib}_ms"] / 1e9 for lib in ("xla", "cublas") if f"{lib}_ms" in times}


def build_workload(args: argparse.Namespace) -> dict[str, Any]:
    """Every request's (input, output) length, capped to max_model_len."""
    ins, outs = datasets.request_lengths(args.dataset, args.num_prompts, args.seed, args.input_len,
                                         args.output_len, args.dataset_path)
    max_len = args.max_model_len or int(np.max(ins + outs))
    ins, outs, capped = datasets.cap_lengths(ins, outs, max_len)
    return {"ins": ins, "outs": outs, "max_model_len": max_len, "capped": capped}


def workload_summary(args: argparse.Namespace, work: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": args.dataset_path or args.dataset, "num_prompts": args.num_prompts, "seed": args.seed,
            "max_model_len": work["max_model_len"], "requests_capped": work["capped"],
            "input_len": datasets.length_stats(work["ins"]), "output_len": datasets.length_stats(work["outs"])}


class CompileClock:
    """Seconds spent compiling step buckets, by phase, timed around ModelRunner._compile
    (start-up compiles every bucket on a GPU; on CPU each compiles when first needed)."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.seconds: dict[str, float] = {}
        self.buckets: dict[str, int] = {}
        # JAX's persistent compilation cache events by phase: {"hits": n, "misses": n}.
        self.cache: dict[str, dict[str, int]] = {}
        from jax import monitoring
        monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_: Any) -> None:
        kind = {"/jax/compilation_cache/cache_hits": "hits",
                "/jax/compilation_cache/cache_misses": "misses"}.get(event)
        if kind:
            counts = self.cache.setdefault(self.phase, {"hits": 0, "misses": 0})
            counts[kind] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from nanoflow_jax.engine.model_runner import ModelRunner

        originals = {name: getattr(ModelRunner, name) for name in ("_compile", "compile_all")}
        clock = self

        def timed(original: Any) -> Any:
            # compile_all compiles many buckets on its own pool; _compile one on first use.
            def run(runner: Any, *a: Any, **k: Any) -> Any:
                t, before = time.perf_counter(), len(runner._compiled)
                try:
                    return original(runner, *a, **k)
                finally:
                    clock.seconds[clock.phase] = clock.seconds.get(clock.phase, 0.0) + time.perf_counter() - t
                    clock.buckets[clock.phase] = clock.buckets.get(clock.phase, 0) + len(runner._compiled) - before
            return run

        for name, original in originals.items():
            setattr(ModelRunner, name, timed(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(ModelRunner, name, original)


@contextlib.contextmanager
def step_recorder(engine: Any) -> Iterator[dict[str, list]]:
    """Host wall time of each engine.step() call and the KV pages in use after it."""
    record: dict[str, list] = {"step_ms": [], "pages_used": []}
    inner = engine.step
    blocks = engine.blocks

    def timed() -> Any:
        t = time.perf_counter()
        try:
            return inner()
        finally:
            record["step_ms"].append(1e3 * (time.perf_counter() - t))
            record["pages_used"].append(blocks.num_usable - blocks.num_free)

    engine.step = timed   # an instance attribute: LLM calls engine.step() per iteration
    try:
        yield record
    finally:
        del engine.step


def percentiles(x: list[float]) -> dict[str, float]:
    if not x:
        return {}
    a = np.asarray(x)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def device_memory() -> dict[str, Any]:
    """The first device's memory statistics after a run, when the backend reports them."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if not stats:
        return {"reported": False, "note": f"the {jax.default_backend()} backend reports no memory statistics"}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {"reported": True, **{k: int(stats[k]) for k in keys if k in stats},
            "note": "peak_bytes_in_use counts from the process start (with --pipeline all, earlier modes too)"}


def check_pool_fits(blocks: Any, work: dict[str, Any], args: argparse.Namespace) -> None:
    """Every request must fit the KV pool alone, or the engine rejects it and the run measures
    fewer requests than asked: stop before timing instead."""
    need = np.array([blocks.pages_for(int(n)) for n in work["ins"] + work["outs"]])
    too_big = int(np.sum(need > blocks.num_usable))
    if too_big:
        raise SystemExit(f"bench.throughput: {too_big} of {len(need)} requests need more KV pages than the pool's "
                         f"{blocks.num_usable} (the longest needs {need.max()} pages of {args.block_size} tokens): "
                         f"pass --num-kv-pages {need.max() + 1} or more, or a smaller --max-model-len to cap requests")


def run_mode(args: argparse.Namespace, pipeline: str, work: dict[str, Any]) -> dict[str, Any]:
    """One LLM with this pipeline: start-up, warm-up, then the timed generate of every request."""
    from nanoflow_jax import LLM, SamplingParams

    clock = CompileClock()
    with clock.installed():
        t0 = time.perf_counter()
        try:
            llm = LLM(args.model, weights=args.weights, dtype=args.dtype, max_model_len=work["max_model_len"],
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      block_size=args.block_size, num_kv_pages=args.num_kv_pages,
                      kv_memory_fraction=args.kv_memory_fraction, kernels=args.kernels, pipeline=pipeline,
                      async_scheduling=bool(args.async_scheduling), fuse_qkv=bool(args.fuse_qkv),
                      decode_only_steps=bool(args.decode_only_steps), fuse_rope_kv=bool(args.fuse_rope_kv),
                      enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                      kv_offload_host_gb=args.kv_offload_host_gb,
                      kv_offload_pages_per_step=args.kv_offload_pages_per_step, seed=args.seed,
                      tensor_parallel_size=args.tensor_parallel_size,
                      compilation_cache_dir=args.compilation_cache_dir,
                      precompile=None if args.precompile == "auto" else args.precompile == "1",
                      token_buckets=tuple(int(b) for b in args.token_buckets.split(",")) if args.token_buckets else None)
        except ValueError as e:
            if args.max_model_len is None and "max_position_embeddings" in str(e):
                raise SystemExit(f"bench.throughput: the longest request has {work['max_model_len']} tokens, more "
                                 f"than the model allows ({e}): pass --max-model-len to cap the requests") from None
            raise
        startup_s = time.perf_counter() - t0
        engine = llm.engine
        check_pool_fits(engine.blocks, work, args)
        prompts = datasets.random_prompts(work["ins"], llm.model_config.vocab_size, args.seed)
        sampling = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True) for n in work["outs"]]

        clock.phase = "warmup"
        t0 = time.perf_counter()
        warm = llm.generate(prompts[:WARMUP_PROMPTS], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        warmup_s = time.perf_counter() - t0
        failed = next((o.error for o in warm if o.error is not None), None)
        if failed is not None:   # the timed run would fail the same way and record zero tokens
            raise SystemExit(f"bench.throughput: the warm-up failed ({pipeline}), so no run is timed: {failed}")
        first = min((o.metrics.first_token_time for o in warm if o.metrics.first_token_time), default=None)
        age = process_age_s()
        first_token_s = None if first is None or age is None else age - (time.time() - first)
        llm.reset_prefix_cache()

        clock.phase = "timed_run"
        it0, pre0 = engine.num_iterations, engine.scheduler.num_preemptions
        tracer = iteration.WindowTracer(engine, args.profile_windows, profile_dir(args, pipeline))
        with step_recorder(engine) as rec, tracer.installed():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sampling, use_tqdm=True)
            elapsed = time.perf_counter() - t0
    iters = engine.num_iterations - it0
    ok = [i for i, o in enumerate(outs) if o.error is None]
    gen_tokens = sum(len(outs[i].outputs[0].token_ids) for i in ok)
    prompt_tokens = int(sum(work["ins"][i] for i in ok))
    total_tokens = gen_tokens + prompt_tokens
    runner = engine.runner
    cache_bytes = int(runner.cache.k.nbytes + runner.cache.v.nbytes)
    result: dict[str, Any] = {
        "pipeline": pipeline, "params": llm.model_config.num_params(),
        "engine": {k: v for k, v in vars(llm.engine_config).items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(runner.kv_dtype),
        "startup_s": startup_s, "warmup_s": warmup_s, "precompiled": bool(runner.precompile),
        # From the process's start to the first token of the warm-up's first request: what a
        # user waits for before the engine answers (imports, weights, pool, compiles).
        "first_token_s": first_token_s, "compilation_cache_dir": args.compilation_cache_dir,
        "compile_s": clock.seconds, "compiled_buckets": clock.buckets, "compilation_cache": clock.cache,
        # Whole steps loaded from / compiled into the engine's executable store.
        "executable_store": (None if runner.store is None
                             else {"hits": runner.store.hits, "misses": runner.store.misses}),
        "elapsed_s": elapsed, "requests": len(outs), "failed_requests": len(outs) - len(ok),
        "first_error": next((o.error for o in outs if o.error is not None), None),
        "prompt_tokens": prompt_tokens, "generated_tokens": gen_tokens, "total_tokens": total_tokens,
        "requests_per_s": len(ok) / elapsed,
        "total_tokens_per_s": total_tokens / elapsed, "output_tokens_per_s": gen_tokens / elapsed,
        # The model is split over tensor_parallel_size devices (1: per device equals the totals).
        "devices": args.tensor_parallel_size,
        "total_tokens_per_s_per_device": total_tokens / elapsed / args.tensor_parallel_size,
        "output_tokens_per_s_per_device": gen_tokens / elapsed / args.tensor_parallel_size,
        "iterations": iters, "ms_per_iteration": 1e3 * elapsed / max(iters, 1),
        "steps": len(rec["step_ms"]), "host_ms_per_step": percentiles(rec["step_ms"]),
        # Wall time of the generate call outside engine.step (routing outputs, the progress bar).
        "host_s_outside_steps": elapsed - 1e-3 * sum(rec["step_ms"]),
        "device_idle": {"measured": False, "share": None, "note": IDLE_NOT_MEASURED},
        "preemptions": engine.scheduler.num_preemptions - pre0,
        "kv_pool": {"pages": runner.num_pages, "usable_pages": engine.blocks.num_usable,
                    "block_size": args.block_size, "bytes": cache_bytes,
                    "peak_pages_used": max(rec["pages_used"], default=0)},
        "memory": device_memory(),
        "kv_offload": None if engine.offload is None else dataclasses.asdict(engine.offload.stats),
        "step_ms": [round(t, 3) for t in rec["step_ms"]],
    }
    result["_tracer"] = tracer   # the run's floor and any traced windows: run(), with the ceilings
    if tracer.traced:
        result["profiled_windows"] = [{k: w[k] for k in ("start", "count")} for w in tracer.traced]
    if clock.seconds.get("timed_run"):
        print(f"bench.throughput: {clock.seconds['timed_run']:.1f} s of the timed run ({pipeline}) compiled "
              f"{clock.buckets['timed_run']} step buckets first needed then: pass --precompile 1 to keep "
              "compiling out of the measurement", file=sys.stderr)
    if result["failed_requests"]:
        print(f"bench.throughput: {result['failed_requests']} of {len(outs)} requests failed ({pipeline}); the "
              f"first: {result['first_error']}", file=sys.stderr)
    del llm, engine, runner
    return result


def add_optimal(result: dict[str, Any], peak: dict[str, float], spec: float | None, params: int) -> None:
    if peak:
        optimal = max(peak.values()) * 1e12 / (2 * params)
        result["optimal_tokens_per_s"] = optimal   # per device, as NanoFlow states it
        result["fraction_of_optimal"] = result["total_tokens_per_s_per_device"] / optimal
    if spec:  # against the datasheet peak: stable across runs, and NanoFlow's yardstick
        result["spec_peak_tflops"] = spec
        result["fraction_of_spec_optimal"] = result["total_tokens_per_s_per_device"] * 2 * params / (spec * 1e12)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def profile_dir(args: argparse.Namespace, pipeline: str) -> Path | None:
    """Where --profile-steps' windows go: --profile-dir, else beside --out, else a temporary
    folder (None without windows: nothing is traced)."""
    if not args.profile_windows:
        return None
    if args.profile_dir:
        return Path(args.profile_dir)
    if args.out:
        return Path(args.out).parent / f"{Path(args.out).stem}_{pipeline}_profile"
    return Path(tempfile.mkdtemp(prefix="nanoflow_profile_"))


def add_iteration_profile(result: dict[str, Any], tracer: Any, args: argparse.Namespace,
                          peak: dict[str, float]) -> None:
    """The traced windows against the run's ceilings (bench.iteration): device idle between
    iterations, and each operation of a mixed and a pure-decode iteration against its floor."""
    import jax

    from nanoflow_jax.config import ModelConfig

    if jax.default_backend() != "gpu" or not peak:
        if tracer.traced:
            result["iteration_profile"] = {"measured": False, "note": "kernel records and ceilings need a GPU run",
                                           "windows": tracer.traced}
        return
    cfg = ModelConfig.from_name(args.model)
    ceil = iteration.Ceilings(max(peak.values()), copy_bandwidth()["copy_gbps"])
    # What the run's own iterations cost at the ceilings, against what they took.
    floor = iteration.run_floor(cfg, tracer.all_steps, ceil)
    result["floor"] = {**floor, "ceilings": dataclasses.asdict(ceil),
                       "of_sequential_floor": round(floor["sequential_s"] / result["elapsed_s"], 3),
                       "of_overlapped_floor": round(floor["overlapped_s"] / result["elapsed_s"], 3)}
    if not tracer.traced:
        return
    report = tracer.reports(cfg, ceil)
    result["iteration_profile"] = report
    if report.get("measured"):
        result["device_idle"] = {"measured": True, "share": report["idle_between_iterations_share"],
                                 "gaps_inside_iterations_share": report["gaps_inside_iterations_share"],
                                 "note": "from the profiled windows' kernel records: time between one iteration's "
                                         "last kernel and the next one's first, over the windows' span"}
    if args.out:
        iteration.plot(report, str(Path(args.out).with_suffix("")) + f"_{result['pipeline']}_iteration.png",
                       f"{args.model} on {result.get('device') or _device_kind()}")


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def run(args: argparse.Namespace, work: dict[str, Any] | None = None) -> dict[str, Any]:
    import jax

    work = work or build_workload(args)
    modes = list(PIPELINES) if args.pipeline == ALL_PIPELINES else [args.pipeline]
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        results[mode] = run_mode(args, mode, work)
        gc.collect()   # one LLM at a time: its KV pool and weights go before the next starts
    params = next(iter(results.values())).pop("params")
    for r in results.values():
        r.pop("params", None)
    on_gpu = jax.default_backend() == "gpu"
    peak = {"given_tflops": args.gemm_peak_tflops} if args.gemm_peak_tflops else (measure_gemm_peak() if on_gpu else {})
    spec = spec_peak_tflops(jax.devices()[0].device_kind)
    for r in results.values():
        add_optimal(r, peak, spec, params)
        add_iteration_profile(r, r.pop("_tracer"), args, peak)
    meta = run_metadata("bench.throughput") if on_gpu else {}
    result: dict[str, Any] = {
        "command": "python -m bench.throughput " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "env": nanoflow_env(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": meta.get("device_nvidia_smi", jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(),
        "model": args.model, "weights": args.weights, "params": params,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "workload": workload_summary(args, work),
        "gemm_peak": peak,
    }
    if args.pipeline != ALL_PIPELINES:
        return {**result, **results[args.pipeline]}
    base = results["sequential"]["total_tokens_per_s"]
    result["modes"] = results
    result["speedup_over_sequential"] = {m: r["total_tokens_per_s"] / base for m, r in results.items()
                                         if m != "sequential"}
    return result


def plot(result: dict[str, Any], work: dict[str, Any], png: str) -> None:
    """Input and output length histograms, tokens/s by pipeline, and each step's host time over the run."""
    plt = pyplot()
    modes = result.get("modes") or {result["pipeline"]: result}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, key, label in ((axes[0, 0], "ins", "input"), (axes[0, 1], "outs", "output")):
        x = work[key]
        ax.hist(x, bins=min(60, max(5, len(np.unique(x)))), color="tab:blue" if key == "ins" else "tab:orange")
        ax.set_title(f"{label} lengths: mean {np.mean(x):.0f}, median {np.median(x):.0f} ({len(x)} requests)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("requests")
    ax = axes[1, 0]
    names = list(modes)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [modes[m]["total_tokens_per_s_per_device"] for m in names], 0.4, label="total")
    ax.bar(pos + 0.2, [modes[m]["output_tokens_per_s_per_device"] for m in names], 0.4, label="output")
    ax.set_xticks(pos, names)
    ax.set_ylabel("tokens/s per device")
    ax.set_title("throughput by pipeline")
    ax.legend()
    ax = axes[1, 1]
    for m in names:
        ax.plot(modes[m]["step_ms"], lw=0.8, label=m)
    ax.set_xlabel("engine step")
    ax.set_ylabel("host ms per step")
    ax.set_title("step time over the run")
    ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']}: {result['workload']['dataset']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    args = parse_args(argv)
    work = build_workload(args)
    result = run(args, work)
    print_and_write(result, args.out)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(result, work, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
