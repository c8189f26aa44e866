"""Offline serving throughput, measured against NanoFlow's yardstick.

    python -m bench.throughput --model llama-3-8b --weights random --num-prompts 512 \
        --input-len 512 --output-len 512 --max-num-batched-tokens 2048 --out bench/results/x.json

NanoFlow's optimal throughput per GPU is GEMM peak / (2 x params) tokens/s: every
token (prompt or generated) must at least pass through every weight once. The peak is
measured in the same run (the faster of XLA's dot and, where installed, cuBLAS via
torch on an 8192^3 bf16 product), so the ratio is honest on whatever card ran it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import library_gemm_ms, nanoflow_env, run_metadata
from nanoflow_jax.config import KERNEL_SETS, PIPELINES
from nanoflow_jax.engine.config import EngineConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--weights", default="random", choices=["auto", "random"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--kv-memory-fraction", type=float, default=None)
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS),
                   help="auto: Pallas kernels on a GPU, XLA ops on CPU; hybrid: Pallas, but XLA's GEMMs")
    p.add_argument("--token-buckets", default=None, help="comma-separated dense-batch sizes to compile")
    p.add_argument("--pipeline", default="sequential", choices=list(PIPELINES),
                   help="sequential | nanobatch | nanoflow (EngineConfig.pipeline)")
    p.add_argument("--async-scheduling", type=int, choices=[0, 1], default=1)
    defaults = EngineConfig()
    p.add_argument("--fuse-qkv", type=int, choices=[0, 1], default=int(defaults.fuse_qkv),
                   help="one QKV GEMM instead of three (0: three, the ablation)")
    p.add_argument("--decode-only-steps", type=int, choices=[0, 1], default=int(defaults.decode_only_steps),
                   help="Pallas: pure-decode batches skip the prefill attention kernel (EngineConfig.decode_only_steps)")
    p.add_argument("--fuse-rope-kv", type=int, choices=[0, 1], default=int(defaults.fuse_rope_kv),
                   help="Pallas: K's RoPE inside the KV-cache write (EngineConfig.fuse_rope_kv)")
    p.add_argument("--gemm-peak-tflops", type=float, default=None,
                   help="skip measuring the GEMM peak and use this (TFLOP/s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p.parse_args(argv)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from nanoflow_jax import LLM, SamplingParams

    max_len = args.max_model_len or args.input_len + args.output_len
    llm = LLM(args.model, weights=args.weights, dtype=args.dtype, max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              block_size=args.block_size, num_kv_pages=args.num_kv_pages,
              kv_memory_fraction=args.kv_memory_fraction, kernels=args.kernels, pipeline=args.pipeline,
              async_scheduling=bool(args.async_scheduling), fuse_qkv=bool(args.fuse_qkv),
              decode_only_steps=bool(args.decode_only_steps), fuse_rope_kv=bool(args.fuse_rope_kv),
              seed=args.seed,
              token_buckets=tuple(int(b) for b in args.token_buckets.split(",")) if args.token_buckets else None)
    vocab = llm.model_config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(10, vocab - 10, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(8, len(prompts))], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    it0 = llm.engine.num_iterations
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    iters = llm.engine.num_iterations - it0
    gen_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    total_tokens = gen_tokens + args.num_prompts * args.input_len
    params = llm.model_config.num_params()

    peak = {"given_tflops": args.gemm_peak_tflops} if args.gemm_peak_tflops else (
        measure_gemm_peak() if jax.default_backend() == "gpu" else {})
    meta = run_metadata("bench.throughput") if jax.default_backend() == "gpu" else {}
    result: dict[str, Any] = {
        "command": "python -m bench.throughput " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "env": nanoflow_env(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": meta.get("device_nvidia_smi", jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(),
        "model": args.model, "weights": args.weights, "params": params,
        "dtype": str(llm.engine.runner.dtype) if hasattr(llm.engine.runner, "dtype") else args.dtype,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "engine": {k: v for k, v in vars(llm.engine_config).items() if isinstance(v, (int, float, str, bool))},
        "elapsed_s": elapsed, "iterations": iters, "ms_per_iteration": 1e3 * elapsed / max(iters, 1),
        "generated_tokens": gen_tokens, "total_tokens": total_tokens,
        "total_tokens_per_s": total_tokens / elapsed, "output_tokens_per_s": gen_tokens / elapsed,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "gemm_peak": peak,
    }
    if peak:
        best = max(peak.values())
        optimal = best * 1e12 / (2 * params)
        result["optimal_tokens_per_s"] = optimal
        result["fraction_of_optimal"] = result["total_tokens_per_s"] / optimal
    spec = spec_peak_tflops(jax.devices()[0].device_kind)
    if spec:  # against the datasheet peak: stable across runs, and NanoFlow's yardstick
        result["spec_peak_tflops"] = spec
        result["fraction_of_spec_optimal"] = result["total_tokens_per_s"] * 2 * params / (spec * 1e12)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
