"""The benchmark CLI (`python -m bench.X`, or the nanoflow-bench-* console scripts):

- throughput: offline serving throughput of the engine against NanoFlow's optimum;
- iteration: where an engine iteration's GPU time goes, each operation against its floor
  (from bench.throughput --profile-steps);
- rollouts: RL rollouts (n samples per prompt, with logprobs) against the same requests
  submitted separately, and the time of `LLM.update_params`;
- kernels: every kernel checked and timed against ceilings, judged by targets;
- targets: the kernel targets' verdicts from kernels result files (one run or many);
- gemm_tune: the Mosaic GEMM configuration search, and its A/B step (`--ab`);
- timeline: GEMM GPU time per call from CUPTI records (the GEMM timing core);
- timing: `device_ms`, the timing every benchmark uses; shapes: shared shapes and operands.

Results and what they mean: bench/RESULTS.md. This module holds run metadata and the
ceilings kernels are compared with.

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
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp

from bench.timing import cold_copies, device_ms, time_fn, timing_mode, torch_time


def nanoflow_env() -> dict[str, str]:
    """The NANOFLOW_* environment (e.g. a GEMM table) a result was measured under."""
    return {k: v for k, v in os.environ.items() if k.startswith("NANOFLOW_")}


def print_and_write(result: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to `out` (folders made) when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


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
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "timing": timing_mode(),
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
        out["torch_copy_gbps"] = 2 * nbytes / torch_time(torch, lambda: b.copy_(a)) / 1e6
        del a, b
        torch.cuda.empty_cache()
    out["copy_gbps"] = max(out.values())
    return out


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
        res["cublas_ms"] = torch_time(torch, lambda: a @ bs[next(calls) % copies])
        del bs
    res["best_ms"] = min(res.values())
    return res


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    """||out - ref|| / ||ref|| in f32 (NaN if out holds a NaN: never passes a bound)."""
    o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(o - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (benchmark machines have no display)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_sm_profile(json_path: str, png_path: str) -> None:
    """Draws a results JSON's SM sweep (performance / best vs SM share) to a PNG."""
    plt = pyplot()
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
