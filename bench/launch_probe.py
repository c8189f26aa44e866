"""Does a Mosaic GPU GEMM pay a fixed cost per launch that XLA's dot does not?

    python -m bench.launch_probe --out launch_probe.json

Times (many calls in one program, `bench.timing.device_ms`) a one-tile GEMM through the Mosaic
kernel and through XLA, then M=128, N=4096 at growing K through both: a per-launch cost
shows as a gap at the smallest sizes that does not grow with K.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench import library_gemm_ms, run_metadata
from bench.timing import device_ms
from pallas_kernels.gemm_mgpu import gemm_mgpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="launch_probe.json")
    ap.add_argument("--ks", default="512,2048,8192")
    a = ap.parse_args(argv)
    res: dict[str, Any] = {"meta": run_metadata("bench.launch_probe"), "results_us": {}}

    def record(name: str, ms: float) -> None:
        res["results_us"][name] = 1e3 * ms
        print(f"{name:32s} {1e3 * ms:8.2f} us", flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))

    x = jax.random.normal(jax.random.key(0), (128, 256), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (256, 256), jnp.bfloat16) / 16
    record("tiny_mosaic_gemm", device_ms(lambda p, q: gemm_mgpu(p, q), x, w))
    record("tiny_mosaic_gemm_1prog", device_ms(lambda p, q: gemm_mgpu(p, q, num_programs=1), x, w))
    record("tiny_xla_dot", device_ms(jnp.dot, x, w))
    for k in (int(v) for v in a.ks.split(",")):
        x = jax.random.normal(jax.random.key(0), (128, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (k, 4096), jnp.bfloat16) / 64
        record(f"m128_n4096_k{k}_mosaic", device_ms(lambda p, q: gemm_mgpu(p, q), x, w))
        lib = library_gemm_ms(128, 4096, k)
        for name in ("xla_ms", "cublas_ms"):
            if name in lib:
                record(f"m128_n4096_k{k}_{name[:-3]}", lib[name])


if __name__ == "__main__":
    main()
