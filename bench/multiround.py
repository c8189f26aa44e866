"""Multi-round conversations: prefill work, throughput and TTFT with and without the prefix
cache and the KV offload tiers (`python -m bench.multiround`).

N conversations run R rounds, `--concurrency` of them at once (the others' pages wait in
the cache or the offload tiers). A round's prompt is the conversation so far (every
earlier prompt and reply) plus a new user turn; turn and reply lengths are drawn from a
length dataset (`bench.datasets`, LMSYS-Chat-1M by default: NanoFlow's multi-round
workload), prompts are random token ids and replies are greedy with `ignore_eos`, so every
mode serves the same tokens (checked: `outputs_identical`). A round starts after the
previous one finished (a user answers after reading the reply).

Modes: `no-cache` (prefix caching off), `cache` (on, device pages only) and `offload` (on,
with `--kv-offload-host-gb`, and a disk tier with `--kv-offload-disk-path`). Reported per
mode: prefill tokens computed, cache hit rate, tokens/s, TTFT; then the offload tiers'
overhead on single-round work (no reuse: the same number of fresh requests, offload on
against off), the host and disk bandwidth of page copies, and one entry saved and loaded
as a raw .npy file (the disk tier's format) against Orbax.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets, nanoflow_env
from nanoflow_jax.config import KERNEL_SETS

MODES = ("no-cache", "cache", "offload")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multiround", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="a GGUF / HF / Orbax path or a configs/models name")
    p.add_argument("--weights", default="random", choices=["auto", "random"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-conversations", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dataset", default="lmsys-chat-1m", help="turn and reply lengths: a bench.datasets name")
    p.add_argument("--max-turn-len", type=int, default=512, help="caps each new user turn (tokens)")
    p.add_argument("--max-output-len", type=int, default=512, help="caps each reply (tokens)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="conversations served at once: a round runs them in groups of this many (default: all)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS))
    p.add_argument("--token-buckets", default=None, help="comma-separated dense-batch sizes to compile")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--kv-offload-host-gb", type=float, default=4.0, help="the offload mode's host budget")
    p.add_argument("--kv-offload-disk-path", default=None, help="the offload mode's disk folder (default: none)")
    p.add_argument("--kv-offload-disk-gb", type=float, default=8.0)
    p.add_argument("--kv-offload-pages-per-step", type=int, default=None,
                   help="EngineConfig.kv_offload_pages_per_step (default: 16 MiB of pages on a GPU, none on CPU)")
    p.add_argument("--bandwidth-pages", type=int, default=64, help="pages per copy in the bandwidth measurement")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side of the single-round overhead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}; use {', '.join(MODES)}")
    try:
        args.dataset = datasets.resolve(args.dataset)
    except ValueError as e:
        p.error(str(e))
    if args.dataset == datasets.CONSTANT:
        p.error("--dataset: a length dataset is needed (e.g. lmsys-chat-1m)")
    for name in ("num_conversations", "rounds", "max_turn_len", "max_output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_workload(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Per conversation and round: the new turn's token ids and the reply length."""
    n, r = args.num_conversations, args.rounds
    ins, outs = datasets.request_lengths(args.dataset, n * r, args.seed)
    ins, outs = np.minimum(ins, args.max_turn_len), np.minimum(outs, args.max_output_len)
    turns = datasets.random_prompts(ins, vocab_size, args.seed)
    return {"turns": [turns[c * r:(c + 1) * r] for c in range(n)],
            "outs": outs.reshape(n, r).tolist(),
            "max_model_len": int(ins.reshape(n, r).sum(1).max() + outs.reshape(n, r).sum(1).max())}


def make_llm(args: argparse.Namespace, mode: str, max_model_len: int, offload: bool | None = None) -> Any:
    import jax

    from nanoflow_jax import LLM

    offload = mode == "offload" if offload is None else offload
    kw: dict[str, Any] = {}
    if offload:
        kw = dict(kv_offload_host_gb=args.kv_offload_host_gb, kv_offload_pages_per_step=args.kv_offload_pages_per_step)
        if args.kv_offload_disk_path:
            kw.update(kv_offload_disk_path=args.kv_offload_disk_path, kv_offload_disk_gb=args.kv_offload_disk_gb)
    return LLM(args.model, weights=args.weights, dtype=args.dtype, max_model_len=max_model_len,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               block_size=args.block_size, num_kv_pages=args.num_kv_pages, kernels=args.kernels,
               enable_prefix_caching=mode != "no-cache", seed=args.seed, show_progress=False,
               # Every bucket (and the offload copies) compiles at start-up, outside the timing;
               # JAX's compilation cache shares them between the modes' engines.
               precompile=True, min_token_bucket=1 if jax.default_backend() == "cpu" else None,
               token_buckets=tuple(int(b) for b in args.token_buckets.split(",")) if args.token_buckets else None,
               **kw)


def serve(engine: Any, prompts: list[list[int]], out_lens: list[int]) -> dict[str, Any]:
    """Submit every prompt at once and serve them; replies, TTFT per request, wall time."""
    from nanoflow_jax import SamplingParams

    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True))
           for p, n in zip(prompts, out_lens)]
    first: dict[str, float] = {}
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            if o.outputs[0].token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - t0
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    elapsed = time.perf_counter() - t0
    return {"replies": [done[i] for i in ids], "ttft_s": [first[i] for i in ids], "elapsed_s": elapsed}


def serve_groups(engine: Any, prompts: list[list[int]], out_lens: list[int], size: int) -> dict[str, Any]:
    """`serve` on groups of `size` requests, one group after another."""
    parts = [serve(engine, prompts[i:i + size], out_lens[i:i + size]) for i in range(0, len(prompts), size)]
    return {"replies": [x for p in parts for x in p["replies"]], "ttft_s": [x for p in parts for x in p["ttft_s"]],
            "elapsed_s": sum(p["elapsed_s"] for p in parts)}


def _ms_stats(x: list[float]) -> dict[str, float]:
    return {"mean_ms": 1e3 * float(np.mean(x)), "p50_ms": 1e3 * float(np.median(x)),
            "p90_ms": 1e3 * float(np.percentile(x, 90))}


def run_rounds(args: argparse.Namespace, mode: str, work: dict[str, Any]) -> dict[str, Any]:
    """Every round of every conversation in one mode (after a short warm-up that compiles)."""
    llm = make_llm(args, mode, work["max_model_len"])
    eng = llm.engine
    serve(eng, [t[0] for t in work["turns"][:2]], [2, 2])   # warm-up: compiles the common buckets
    llm.reset_prefix_cache()
    history: list[list[int]] = [[] for _ in work["turns"]]
    rounds, replies = [], []
    for r in range(args.rounds):
        prompts = [h + t[r] for h, t in zip(history, work["turns"])]
        pre0 = eng.num_prefill_tokens
        stats0 = eng.prefix_cache_stats
        hits0 = stats0.hits if stats0 else 0
        res = serve_groups(eng, prompts, [o[r] for o in work["outs"]], args.concurrency or len(prompts))
        history = [p + rep for p, rep in zip(prompts, res["replies"])]
        replies.append(res["replies"])
        gen = sum(map(len, res["replies"]))
        prompt_tokens = sum(map(len, prompts))
        rounds.append({
            "round": r + 1, "prompt_tokens": prompt_tokens, "generated_tokens": gen,
            "prefill_tokens_computed": eng.num_prefill_tokens - pre0,
            "cache_hit_tokens": (eng.prefix_cache_stats.hits if stats0 else 0) - hits0,
            "elapsed_s": res["elapsed_s"], "total_tokens_per_s": (prompt_tokens + gen) / res["elapsed_s"],
            "output_tokens_per_s": gen / res["elapsed_s"], "ttft": _ms_stats(res["ttft_s"]),
        })
    total = {k: sum(r[k] for r in rounds) for k in ("prompt_tokens", "generated_tokens",
                                                     "prefill_tokens_computed", "cache_hit_tokens", "elapsed_s")}
    total["total_tokens_per_s"] = (total["prompt_tokens"] + total["generated_tokens"]) / total["elapsed_s"]
    total["ttft_mean_ms"] = float(np.mean([r["ttft"]["mean_ms"] for r in rounds]))
    result = {"mode": mode, "rounds": rounds, "total": total, "preemptions": eng.scheduler.num_preemptions,
              "kv_pages": eng.blocks.num_usable, "_replies": replies}
    if eng.offload is not None:
        result["offload"] = vars(eng.offload.stats).copy()
        result["offload"]["host_pages"] = eng.offload.num_host_pages
    del llm, eng
    gc.collect()
    return result


def single_round_overhead(args: argparse.Namespace, work: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Fresh requests (nothing to reuse), prefix caching on, with and without the offload tiers."""
    n = args.num_conversations * args.rounds
    ins, outs = datasets.request_lengths(args.dataset, n, args.seed + 1)
    ins, outs = np.minimum(ins, args.max_turn_len), np.minimum(outs, args.max_output_len)
    prompts = datasets.random_prompts(ins, vocab_size, args.seed + 1)
    res: dict[str, Any] = {"requests": n, "repeats": args.repeats}
    # Off and on alternate, the best run of each counts: a shared machine's noise is one-sided.
    for _ in range(args.repeats):
        for name, offload in (("offload_off", False), ("offload_on", True)):
            llm = make_llm(args, "cache", work["max_model_len"], offload=offload)
            serve(llm.engine, prompts[:2], [2, 2])
            llm.reset_prefix_cache()
            out = serve(llm.engine, prompts, outs.tolist())
            tokens = int(ins.sum()) + sum(map(len, out["replies"]))
            run = {"elapsed_s": out["elapsed_s"], "total_tokens_per_s": tokens / out["elapsed_s"],
                   "ttft": _ms_stats(out["ttft_s"])}
            if llm.engine.offload is not None:   # with where the offload's time went
                run["saved_pages"] = llm.engine.offload.stats.saved_pages
                run["offload"] = dataclasses.asdict(llm.engine.offload.stats)
            if name not in res or run["total_tokens_per_s"] > res[name]["total_tokens_per_s"]:
                res[name] = run
            del llm
            gc.collect()
    res["overhead"] = res["offload_off"]["total_tokens_per_s"] / res["offload_on"]["total_tokens_per_s"] - 1
    return res


def _best_s(fn: Any, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth(args: argparse.Namespace, work: dict[str, Any]) -> dict[str, Any]:
    """GB/s of page copies: device -> host (the offload gather and the lander's read into the
    LRU, and the gathers into pinned memory alone), host -> device (the reload scatter),
    disk write and read (with checksums); one entry as raw .npy against Orbax."""
    import jax

    from nanoflow_jax.engine.kv_disk import DiskKVStore
    from nanoflow_jax.engine.kv_offload import KVOffloader
    from nanoflow_jax.engine.prefix_cache import page_key

    llm = make_llm(args, "cache", work["max_model_len"])
    runner = llm.engine.runner
    n = max(1, min(args.bandwidth_pages, runner.num_pages - 1))
    pages = list(range(1, n + 1))
    keys = [page_key(b"bench", [i]) for i in pages]
    page_bytes = int(runner.cache.k.nbytes + runner.cache.v.nbytes) // runner.num_pages
    off = KVOffloader(2 * n * page_bytes, page_bytes)

    def to_host() -> None:
        off._host.clear()
        off.save(runner.cache, list(zip(pages, keys)))
        off.land(wait=True)   # the device-to-host copy and the read out of pinned memory

    def to_pinned() -> None:   # the gathers alone, until in pinned memory (no lander)
        jax.block_until_ready(off.gather(runner.cache, pages))

    def to_device() -> None:
        off.queue_load(pages, off.take(keys, len(keys)))
        runner.cache = off.dispatch_loads(runner.cache)
        jax.block_until_ready(runner.cache)

    to_host()
    to_device()   # compiles both
    nbytes = n * page_bytes
    res: dict[str, Any] = {"pages": n, "page_bytes": page_bytes,
                           "device_to_host_gbps": nbytes / _best_s(to_host) / 1e9,
                           "device_to_pinned_gbps": nbytes / _best_s(to_pinned) / 1e9,
                           "host_to_device_gbps": nbytes / _best_s(to_device) / 1e9}
    host_pages = [off._host[k] for k in keys]
    with tempfile.TemporaryDirectory(dir=args.kv_offload_disk_path) as d:
        disk = DiskKVStore(Path(d) / "tier", 4 * nbytes, {"bench": True}, dtype=host_pages[0].dtype)
        t0 = time.perf_counter()
        for k, p in zip(keys, host_pages):
            disk.put(k, p)
        disk.flush()
        res["disk_write_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
        res["disk_read_gbps"] = nbytes / _best_s(lambda: [disk.get(k) for k in keys], 3) / 1e9
        disk.close()
        # The disk tier's unit (one page) and a whole request's pages as one entry.
        res["entry_one_page"] = serialization(host_pages[0][:, :, None], Path(d) / "one")
        res["entry"] = serialization(np.stack(host_pages, axis=2), Path(d) / "all")
    del llm
    gc.collect()
    return res


def serialization(entry: np.ndarray, folder: Path) -> dict[str, Any]:
    """Save and load one entry (pages [2, L, n, ps, K, D]) as the disk tier does (raw .npy,
    sha256, temporary file then rename) and with Orbax's PyTree checkpointer."""
    import orbax.checkpoint as ocp

    from nanoflow_jax.engine.kv_disk import npy_parts, write_parts

    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "entry.npy"

    def raw_save() -> None:   # as the disk tier writes a page: no copy, hashed as written
        tmp = folder / "entry.npy.tmp"
        write_parts(tmp, npy_parts(entry))
        os.replace(tmp, raw)

    def raw_load() -> np.ndarray:
        data = raw.read_bytes()
        hashlib.sha256(data).hexdigest()
        page = np.load(io.BytesIO(data), allow_pickle=False)
        return page.view(entry.dtype)   # .npy keeps bfloat16 as raw 2-byte voids, as the disk tier reads it

    ckpt = ocp.PyTreeCheckpointer()
    count = iter(range(1000))

    def orbax_save() -> None:
        ckpt.save(folder / f"orbax_{next(count)}", {"kv": entry})

    def orbax_load() -> Any:
        return ckpt.restore(folder / "orbax_0")

    out = {"bytes": int(entry.nbytes), "raw_npy_save_ms": 1e3 * _best_s(raw_save),
           "raw_npy_load_ms": 1e3 * _best_s(raw_load), "orbax_save_ms": 1e3 * _best_s(orbax_save),
           "orbax_load_ms": 1e3 * _best_s(orbax_load)}
    np.testing.assert_array_equal(raw_load(), entry)
    np.testing.assert_array_equal(np.asarray(orbax_load()["kv"]), entry)
    return out


def main(argv: list[str] | None = None) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    import jax

    args = parse_args(argv)
    from nanoflow_jax.config import ModelConfig, available_configs

    vocab = ModelConfig.from_name(args.model).vocab_size if args.model in available_configs() else None
    if vocab is None:
        raise SystemExit("bench.multiround: --model must be a configs/models name (prompts are random token ids)")
    work = build_workload(args, vocab)
    result: dict[str, Any] = {
        "command": "python -m bench.multiround " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "env": nanoflow_env(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "model": args.model, "dataset": args.dataset, "conversations": args.num_conversations,
        "rounds": args.rounds, "concurrency": args.concurrency or args.num_conversations,
        "max_model_len": work["max_model_len"], "complete": False, "modes": {},
    }

    def write() -> None:
        # After every part: a run cut off by a time limit keeps what it measured.
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))

    modes, replies = result["modes"], []
    for mode in args.modes:
        modes[mode] = run_rounds(args, mode, work)
        replies.append(modes[mode].pop("_replies"))
        result["outputs_identical"] = all(r == replies[0] for r in replies)
        if "no-cache" in modes:
            base = modes["no-cache"]["total"]
            for m in modes.values():
                m["prefill_reduction"] = base["prefill_tokens_computed"] / max(1, m["total"]["prefill_tokens_computed"])
                m["speedup"] = m["total"]["total_tokens_per_s"] / base["total_tokens_per_s"]
                m["ttft_ratio"] = m["total"]["ttft_mean_ms"] / base["ttft_mean_ms"]
        write()
        t = modes[mode]["total"]
        print(f"{mode:9s} prefill computed {t['prefill_tokens_computed']:8d} of {t['prompt_tokens']:8d} prompt tokens "
              f"({modes[mode].get('prefill_reduction', 1):.2f}x fewer), {t['total_tokens_per_s']:9.1f} tok/s, "
              f"TTFT {t['ttft_mean_ms']:.0f} ms", flush=True)
    result["single_round_offload"] = single_round_overhead(args, work, vocab)
    write()
    result["bandwidth"] = bandwidth(args, work)
    result["complete"] = True
    write()
    s = result["single_round_offload"]
    print(f"single-round offload overhead {100 * s['overhead']:+.1f}%; bandwidth {json.dumps(result['bandwidth'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
