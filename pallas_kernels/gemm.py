"""GEMM entry points: backend choice between Mosaic GPU and the Triton lowering.

`backend="auto"` takes Mosaic GPU for 16-bit inputs on a GPU (it reaches library
speed on Hopper; the Triton lowering does not) and the Triton lowering otherwise
(f32 inputs, and interpret mode, whose generic interpreter is much faster than
Mosaic GPU's). Pass backend="mosaic" with interpret=True to test the Mosaic kernel on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gemm_mgpu import gemm_mgpu
from pallas_kernels.gemm_triton import gemm_triton

BACKENDS = ("auto", "mosaic", "triton")


def at_layer(w: jax.Array, layer: jax.Array | int | None) -> jax.Array:
    """w itself, or with `layer` given, that layer of the stacked [L, ...] weights."""
    return w if layer is None else jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def _pick(backend: str, x: jax.Array, interpret: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    sixteen_bit = x.dtype in (jnp.bfloat16, jnp.float16)
    return "mosaic" if (sixteen_bit and not interpret) else "triton"


def gemm(x: jax.Array, w: jax.Array, *, bias: jax.Array | None = None,
         residual: jax.Array | None = None, num_programs: int | None = None,
         interpret: bool = False, backend: str = "auto", layer: jax.Array | int | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (+ bias [N]) (+ residual [M, N]) -> [M, N] in x.dtype.

    f32 accumulation; the epilogue (bias, residual) is applied to the f32 accumulator
    before the single rounding. `num_programs` = SMs to use (default: all), any value >= 1.
    QKV projection: gemm(x, wqkv, bias=bqkv); attention output / down projection with
    the residual stream: gemm(attn, wo, residual=h).
    layer: w is the stacked [L, K, N] weights of every layer and this int32 scalar picks
    one. The Mosaic kernel reads that layer in place; slicing it in XLA instead copies it
    wherever the slice cannot be folded into the kernel's operand (a stream region).
    """
    if _pick(backend, x, interpret) == "mosaic":
        return gemm_mgpu(x, w, bias=bias, residual=residual, num_programs=num_programs,
                         interpret=interpret, layer=layer)
    return gemm_triton(x, at_layer(w, layer), bias=bias, residual=residual, num_programs=num_programs,
                       interpret=interpret)


def gemm_silu_mul(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *,
                  num_programs: int | None = None, interpret: bool = False,
                  backend: str = "auto", layer: jax.Array | int | None = None) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up) -> [M, F], both products in one kernel (x read once);
    `layer` as in `gemm`."""
    if _pick(backend, x, interpret) == "mosaic":
        return gemm_mgpu(x, w_gate, w_up=w_up, num_programs=num_programs, interpret=interpret, layer=layer)
    return gemm_triton(x, at_layer(w_gate, layer), w_up=at_layer(w_up, layer), num_programs=num_programs,
                       interpret=interpret)
