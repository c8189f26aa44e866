"""Benchmark helpers: timing, run metadata and the ceilings kernels are compared with.

Ceilings are measured in the same run as the kernels: a device copy (GB/s counting
bytes read plus written, best of XLA and PyTorch) and the best library GEMM (XLA's
dot and cuBLAS through PyTorch) on the very shapes being benchmarked.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


WARMUP_MS = 100.0  # busy time before sampling, so the GPU is at its working clocks


def _warm_up(call: Callable[[], Any], sync: Callable[[Any], Any], warmup_ms: float) -> None:
    """Calls `call` back to back for about warmup_ms. After an idle spell (a compile) the
    GPU's clocks ramp up over tens of ms; samples taken at once read the same kernel
    10-30% slower in one run than in the next."""
    sync(call())
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        sync(call())


def time_fn(fn: Callable[..., Any], *args: Any, iters: int = 20, repeats: int = 5,
            warmup_ms: float = WARMUP_MS) -> float:
    """Median over `repeats` of the mean time (ms) of `iters` back-to-back calls.

    Back-to-back calls with one sync at the end keep Python dispatch off the
    critical path; the first call (compilation) and a warm-up are excluded.
    """
    _warm_up(lambda: fn(*args), jax.block_until_ready, warmup_ms)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(samples)


def chained(fn: Callable[..., Any], reps: int, thread: int = 0,
            rotate: tuple[int, ...] = ()) -> Callable[..., Any]:
    """One jitted program of `reps` dependent calls of fn, to time device work alone.

    Back-to-back jitted calls of a ~20 us kernel measure Python dispatch, not the GPU.
    thread=0: each call's first argument gets one element of the previous output
    patched in (a data dependency, so XLA can neither hoist nor merge the calls);
    thread=k: the k outputs replace the first k arguments (in-place cache kernels).
    rotate: positions of arguments passed as a tuple of copies; call i takes copy
    i % len, so operands smaller than the L2 cache are not re-read from it (in a model
    each layer's weights come from HBM).
    """
    def run(*args: Any) -> Any:
        args = list(args)
        copies = {i: args[i] for i in rotate}
        out = None
        for rep in range(reps):
            for i, c in copies.items():
                args[i] = c[rep % len(c)]
            out = fn(*args)
            if thread:
                args[:thread] = list(out) if thread > 1 else [out]
            else:
                leaf = jax.tree.leaves(out)[0].reshape(-1)[:1]
                a0 = args[0]
                patch = leaf.astype(a0.dtype).reshape((1,) * a0.ndim)
                args[0] = jax.lax.dynamic_update_slice(a0, patch, (0,) * a0.ndim)
        return out

    return jax.jit(run)


def device_ms(fn: Callable[..., Any], *args: Any, reps: int = 10, thread: int = 0,
              repeats: int = 5, min_sample_ms: float = 3.0, rotate: tuple[int, ...] = ()) -> float:
    """Per-call device time (ms) of fn from a chain of `reps` dependent calls.

    Each sample runs the chained program enough times back to back to last at least
    `min_sample_ms`, so the one dispatch latency a sample cannot hide is a small share
    of it (3 runs of a 5-call chain of 40 us kernels would be 0.6 ms, ~10% latency).
    """
    run = chained(fn, reps, thread, rotate)
    once = time_fn(run, *args, iters=1, repeats=1, warmup_ms=0.0)
    iters = max(3, min(200, int(min_sample_ms / max(once, 1e-3)) + 1))
    return time_fn(run, *args, iters=iters, repeats=repeats) / reps


def nanoflow_env() -> dict[str, str]:
    """The NANOFLOW_* environment (e.g. a GEMM table) a result was measured under."""
    return {k: v for k, v in os.environ.items() if k.startswith("NANOFLOW_")}


def run_metadata(module: str = "bench.kernels") -> dict[str, Any]:
    """Device (from nvidia-smi when present), versions, date and the exact command."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        device = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        device = f"nvidia-smi unavailable: {exc}"
    dev = jax.devices()[0]
    return {
        "device_nvidia_smi": device,
        "jax_device": str(dev.device_kind),
        "num_sms": int(getattr(dev, "core_count", 0) or 0),
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m {module} " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "env": nanoflow_env(),
    }


def torch_module() -> Any | None:
    try:
        import torch  # noqa: PLC0415

        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def copy_bandwidth(nbytes: int = 2 << 30) -> dict[str, float]:
    """Device-to-device copy GB/s (read + write bytes), XLA and PyTorch."""
    out: dict[str, float] = {}
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    # x + 1 cannot be elided by XLA, unlike a plain copy; it streams like one.
    # Separate calls (2 GiB takes ~1 ms, so dispatch is hidden): a chain would be fused
    # by XLA into one pass and overstate the bandwidth (seen: 15 TB/s "copies").
    ms = time_fn(jax.jit(lambda a: a + jnp.bfloat16(1)), x, iters=10, repeats=5)
    out["xla_copy_gbps"] = 2 * nbytes / ms / 1e6
    del x
    torch = torch_module()
    if torch is not None:
        a = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
        b = torch.empty_like(a)
        out["torch_copy_gbps"] = 2 * nbytes / _torch_time(torch, lambda: b.copy_(a)) / 1e6
        del a, b
        torch.cuda.empty_cache()
    out["copy_gbps"] = max(out.values())
    return out


def _torch_time(torch: Any, fn: Callable[[], Any], iters: int = 20, repeats: int = 5) -> float:
    _warm_up(fn, lambda _: torch.cuda.synchronize(), WARMUP_MS)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


L2_BYTES = 60 << 20  # H100/H200 L2 cache (50 MB on the H100 SXM, 60 MB on the H200)


def cold_copies(nbytes: int) -> int:
    """Copies of an operand of nbytes to rotate through so that successive calls never
    find it in L2: together at least twice the L2 size (at most 8)."""
    return max(1, min(8, -(-2 * L2_BYTES // max(nbytes, 1))))


def copies_of(a: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """a and n - 1 copies of it in their own buffers (for `rotate`)."""
    return (a,) + tuple(jnp.array(a, copy=True) for _ in range(n - 1))


def library_gemm_ms(m: int, n: int, k: int) -> dict[str, float]:
    """x [m, k] @ w [k, n] in bf16 through XLA and through cuBLAS (PyTorch): ms each,
    with the weight rotated through cold_copies() copies as in a model's layers."""
    copies = cold_copies(2 * k * n)
    keys = jax.random.split(jax.random.key(1), copies + 1)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    ws = tuple(jax.random.normal(kw, (k, n), jnp.bfloat16) for kw in keys[1:])
    res = {"xla_ms": device_ms(jnp.dot, x, ws, reps=max(10, copies), rotate=(1,))}
    torch = torch_module()
    if torch is not None:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bs = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        calls = itertools.count()
        res["cublas_ms"] = _torch_time(torch, lambda: a @ bs[next(calls) % copies])
        del bs
    res["best_ms"] = min(res.values())
    return res


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    """||out - ref|| / ||ref|| in f32 (NaN if out holds a NaN: never passes a bound)."""
    o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(o - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))


def plot_sm_profile(json_path: str, png_path: str) -> None:
    """Draws a results JSON's SM sweep (performance / best vs SM share) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        res = json.load(f)
    sms = res["meta"].get("num_sms") or max(max(v["programs"]) for v in res["sm_profile"].values() if "programs" in v)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in res["sm_profile"].items():
        if "programs" in v:
            ax.plot([p / sms for p in v["programs"]], v["rel_perf"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="linear")
    ax.set_xlabel("share of SMs (num_programs / SMs)")
    ax.set_ylabel("performance / best")
    ax.set_title(f"nanoflow_jax kernels vs SM budget ({res['meta']['jax_device']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
