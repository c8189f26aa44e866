"""Synthetic kernel profiles for the search tests: a roofline made up from a GPU's peak FLOP/s
and bandwidth, NOT a measurement (source "synthetic"). `synthetic_profile_h200.json` beside
this file is `synthetic_profile(ModelConfig.from_name("llama-3-8b"))` for the CLI test."""

from __future__ import annotations

from typing import Any

from nanoflow_jax.autosearch import shape_key
from nanoflow_jax.search.profile import OPS, UNBUDGETED, OpTable, Profile

TOKENS = (16, 64, 256, 1024, 4096)
ROWS = (1, 64, 256, 1024)
KEYS = (1e3, 1e5, 1e6, 1e7, 1e8)
PROGRAMS = (16, 33, 66, 99, 132)


def synthetic_profile(cfg: Any, *, sms: int = 132, peak_tflops: float = 700.0, bandwidth_gbps: float = 4000.0,
                      memory_saturation: float = 0.5, launch_ms: float = 0.004, device: str = "NVIDIA H200",
                      memory_bytes: int = 143771 << 20, dtype_bytes: int = 2) -> Profile:
    """Compute at peak x programs / SMs; memory bandwidth saturating at `memory_saturation` of
    the SMs (1.0: linear in programs, so no op gains from sharing the GPU)."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def flops_ms(flops: float, p: int) -> float:
        return flops / (peak_tflops * 1e9 * p / sms)

    def bytes_ms(nbytes: float, p: int) -> float:
        return nbytes / (bandwidth_gbps * 1e6 * min(1.0, p / (memory_saturation * sms)))

    def gemm(kd: int, nd: int):
        return lambda t, p: max(flops_ms(2 * t * kd * nd, p), bytes_ms(dtype_bytes * (kd * nd + t * (kd + nd)), p))

    per_token_norm = dtype_bytes * (4 * e + 2 * (h + k) * d + 2 * k * d)
    cost = {
        "qkv": gemm(e, (h + 2 * k) * d), "o": gemm(h * d, e), "gate_up": gemm(e, 2 * f), "down": gemm(f, e),
        "lm_head": gemm(e, v),
        "prefill_attention": lambda keys, p: flops_ms(4 * keys * h * d, p) / 0.6,
        "decode_attention": lambda keys, p: bytes_ms(keys * 2 * k * d * dtype_bytes, p),
        "norm_rope": lambda t, p: bytes_ms(t * per_token_norm, p),
        "sampler": lambda rows, p: bytes_ms(rows * v * 4, p),
    }
    tables = {}
    for op, (_, axis) in OPS.items():
        work = {"tokens": TOKENS, "rows": ROWS, "keys": KEYS}[axis]
        progs = (sms,) if op in UNBUDGETED else tuple(p for p in PROGRAMS if p < sms) + (sms,)
        tables[op] = OpTable(tuple(float(w) for w in work), progs,
                             tuple(tuple(launch_ms + cost[op](w, p) for p in progs) for w in work))
    return Profile(device=device, num_sms=sms, shape=shape_key(cfg), dtype="bfloat16", ops=tables, source="synthetic",
                   memory_bytes=memory_bytes, meta={"note": "synthetic roofline for tests, not a measurement"})
