"""The shapes and operands the benchmarks share: Llama-3-8B's layer, and tiny stand-ins
for interpreted (CPU) smoke runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gemm_config import gemm_kind

# Hidden size, query heads, KV heads, head dim, MLP width.
LLAMA3_8B = dict(E=4096, H=32, K=8, D=128, F=14336)
SMOKE = dict(E=128, H=4, K=2, D=32, F=256)
PAGE = 16  # tokens per KV page
GEMM_MS = (128, 256, 512, 1024, 2048)  # dense batch sizes: the engine's decode and prefill buckets


def gemm_shapes(dims: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The layer's four GEMMs as (K, N): fused QKV, O + residual, gate/up + SiLU (per
    weight), down + residual."""
    e, h, k, d, f = (dims[c] for c in "EHKDF")
    return {"qkv": (e, (h + 2 * k) * d), "o_res": (h * d, e), "gate_up_silu": (e, f), "down_res": (f, e)}


SHAPES = gemm_shapes(LLAMA3_8B)
# The tuned table's kind (gemm_config.gemm_kind) of each op, and the ops of each kind.
KIND = {op: gemm_kind(op == "gate_up_silu", op.endswith("_res"), n, k) for op, (k, n) in SHAPES.items()}
OPS = {kind: tuple(op for op, k in KIND.items() if k == kind) for kind in dict.fromkeys(KIND.values())}


def gemm_operands(op: str, m: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [m, K], w and w_up [K, N] (scaled like a layer's weights) and residual [m, N] in
    bf16 for one of SHAPES, the same for a given (op, m) in every benchmark."""
    k, n = SHAPES[op]
    keys = jax.random.split(jax.random.key(m), 4)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16) * 0.03
    up = jax.random.normal(keys[2], (k, n), jnp.bfloat16) * 0.03
    r = jax.random.normal(keys[3], (m, n), jnp.bfloat16)
    return x, w, up, r
