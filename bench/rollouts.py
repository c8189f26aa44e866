"""RL rollouts through the engine: P prompts x n samples x L tokens, as one request per
prompt with `n` samples (sharing the prompt's KV pages) against the same P*n requests
submitted separately, and the time of `LLM.update_params` (weights swapped in place).

    python -m bench.rollouts                                    # GPU: 256 x 8 x 512, Llama-3-8B shapes
    python -m bench.rollouts --model smollm2-135m --num-prompts 4 --n 4 --input-len 32 --output-len 16

Both runs draw the same tokens: sample i of a grouped request uses the seed that the i-th
separate copy of its prompt is given (`llm_engine.sample_seed`), and `ignore_eos` fixes
every length, so they do the same decode work and differ only in the prompt work and pages
that the samples share. Rollouts sample (temperature 1) and return the sampled token's
logprob (`--logprobs 0`), as an RL trainer needs.
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

from bench import datasets, nanoflow_env, print_and_write, run_metadata
from bench.throughput import CompileClock, device_memory, percentiles, step_recorder
from nanoflow_jax.config import KERNEL_SETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rollouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--weights", default="random", choices=["auto", "random"])
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logprobs", type=int, default=0, help="top logprobs per token (-1: none)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS))
    p.add_argument("--token-buckets", default=None, help="comma-separated dense-batch sizes to compile")
    p.add_argument("--precompile", default="auto", choices=["auto", "0", "1"])
    p.add_argument("--update-repeats", type=int, default=3, help="timed update_params calls after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here (e.g. bench/results/rollouts.json)")
    args = p.parse_args(argv)
    for name in ("num_prompts", "n", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def timed_generate(llm: Any, prompts: list[list[int]], sampling: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """One generate call: wall time, tokens, engine steps and the KV pages it held at most."""
    engine = llm.engine
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:   # neither run may reuse the other's cached prompt pages
        reset()
    it0 = engine.num_iterations
    with step_recorder(engine) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    comps = [c for o in outs if o.error is None for c in o.outputs]
    generated = sum(len(c.token_ids) for c in comps)
    return {"elapsed_s": elapsed, "requests": len(outs), "samples": len(comps),
            "failed_requests": sum(o.error is not None for o in outs),
            "generated_tokens": generated, "output_tokens_per_s": generated / elapsed,
            "iterations": engine.num_iterations - it0, "host_ms_per_step": percentiles(rec["step_ms"]),
            "peak_kv_pages_used": max(rec["pages_used"], default=0)}, outs


def time_updates(llm: Any, new_params: Any, repeats: int) -> dict[str, Any]:
    """update_params wall time until the engine's new weights are ready; the first call
    also compiles the re-layout (once per engine)."""
    import jax

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        llm.update_params(new_params)
        jax.block_until_ready(llm.engine.runner.params)
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "repeat_s": times[1:], "median_s": float(np.median(times[1:])) if repeats else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from nanoflow_jax import LLM, ModelConfig, SamplingParams
    from nanoflow_jax.engine.llm_engine import sample_seed
    from nanoflow_jax.models.params import init_params

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    # The "trainer's" weights exist before the engine sizes its KV pool around them.
    trainer_params = init_params(ModelConfig.from_name(args.model), jax.random.key(args.seed + 1), dtype)
    clock = CompileClock()
    with clock.installed():
        t0 = time.perf_counter()
        llm = LLM(args.model, weights=args.weights, dtype=dtype, max_model_len=args.input_len + args.output_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  num_kv_pages=args.num_kv_pages, kernels=args.kernels, seed=args.seed,
                  precompile=None if args.precompile == "auto" else args.precompile == "1",
                  token_buckets=tuple(int(b) for b in args.token_buckets.split(",")) if args.token_buckets else None)
        startup_s = time.perf_counter() - t0
        vocab = llm.model_config.vocab_size
        prompts = datasets.random_prompts(np.full(args.num_prompts, args.input_len), vocab, args.seed)
        common = dict(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                      logprobs=None if args.logprobs < 0 else args.logprobs)
        clock.phase = "warmup"
        llm.generate(prompts[:2], SamplingParams(**{**common, "max_tokens": 4}, n=2, seed=1), use_tqdm=False)
        seeds = [args.seed + 1000 * i for i in range(args.num_prompts)]
        clock.phase = "grouped"
        grouped, g_outs = timed_generate(llm, prompts, [SamplingParams(n=args.n, seed=s, **common) for s in seeds])
        clock.phase = "separate"
        separate, s_outs = timed_generate(llm, [p for p in prompts for _ in range(args.n)],
                                          [SamplingParams(seed=sample_seed(s, i), **common)
                                           for s in seeds for i in range(args.n)])
        clock.phase = "update_params"
        updates = time_updates(llm, trainer_params, args.update_repeats)
    same = [c.token_ids for o in g_outs for c in o.outputs] == [o.outputs[0].token_ids for o in s_outs]
    meta = run_metadata("bench.rollouts") if jax.default_backend() == "gpu" else {}
    return {
        "command": "python -m bench.rollouts " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "env": nanoflow_env(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": meta.get("device_nvidia_smi", jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(), "model": args.model, "weights": args.weights, "dtype": dtype,
        "params": llm.model_config.num_params(),
        "workload": {"num_prompts": args.num_prompts, "n": args.n, "input_len": args.input_len,
                     "output_len": args.output_len, "temperature": args.temperature, "logprobs": args.logprobs},
        "engine": {k: v for k, v in vars(llm.engine_config).items() if isinstance(v, (int, float, str, bool))},
        "kv_pool_pages": llm.engine.runner.num_pages, "startup_s": startup_s,
        "compile_s": clock.seconds, "compiled_buckets": clock.buckets,
        "grouped": grouped, "separate": separate,
        "speedup_grouped_over_separate": grouped["output_tokens_per_s"] / separate["output_tokens_per_s"],
        "same_tokens": same, "prefix_cache_reset_between_runs": hasattr(llm.engine, "reset_prefix_cache"),
        "update_params": updates, "memory": device_memory(),
    }


def main(argv: list[str] | None = None) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    args = parse_args(argv)
    result = run(args)
    print_and_write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
