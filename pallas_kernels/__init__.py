"""Pallas GPU kernels with explicit SM budgets (`num_programs`) for nanoflow_jax.

Every entry point takes `num_programs` (how many SMs / CTAs it may occupy; any value
>= 1 is correct, default all SMs) and `interpret` (True runs it on CPU). The kernels
are persistent: program i handles work items i, i + num_programs, ...
Pure-jnp equivalents live in `pallas_kernels.reference` (the model's XLA path).
"""

from pallas_kernels import horizontal
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.gemm import gemm, gemm_silu_mul
from pallas_kernels.kv_pages import gather_pages, scatter_pages, write_kv
from pallas_kernels.norm_rope import apply_rope, rms_norm
from pallas_kernels.prefill_attention import paged_prefill_attention

__all__ = [
    "gemm", "gemm_silu_mul", "paged_decode_attention", "paged_prefill_attention",
    "rms_norm", "apply_rope", "write_kv", "gather_pages", "scatter_pages",
]
