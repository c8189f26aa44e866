"""Helpers shared by the kernels: program budgets, block-size choice, interpreters.

Every kernel is persistent: it launches `num_programs` programs and program `i`
handles work items `i, i + num_programs, ...`. The budget is the share of the
GPU's SMs a nano-operation gets; when it is None we take every SM.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

CPU_DEFAULT_PROGRAMS = 4  # interpret mode: any small count exercises the striding


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """SM count of the default device (132 on H100/H200); a small constant on CPU."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return int(getattr(dev, "core_count", 132) or 132)
    return CPU_DEFAULT_PROGRAMS


def resolve_programs(num_programs: int | None, num_items: int | None = None) -> int:
    """The launch size: the budget (default all SMs), never more than the work items.

    Launching more programs than items would only add idle programs, so we cap;
    correctness for any budget >= 1 does not depend on the cap.
    """
    p = num_sms() if num_programs is None else int(num_programs)
    if p < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    if num_items is not None:
        p = max(1, min(p, num_items))
    return p


def pick_block(dim: int, candidates: tuple[int, ...]) -> int | None:
    """Largest candidate block that divides `dim` (None if none does)."""
    for c in candidates:
        if dim % c == 0:
            return c
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Pads `axis` up to a multiple, so no tile reads or writes out of bounds.

    Pallas' interpreter rejects out-of-bounds slices and Triton-lowered tiles must be
    powers of two, so ragged edges are padded here instead of masked in the kernel.
    The engine's shapes are buckets that are already multiples, so this is a no-op there.
    """
    size = x.shape[axis]
    extra = (-size) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def persistent_loop(num_items: Any, body: Callable[[Any], None], programs: tuple[Any, int] | None = None) -> None:
    """Runs body(item) for items pid, pid + P, ... < num_items (num_items may be traced).

    programs: (this program's index among them, their count) when only some of the
    kernel's programs do this work (a horizontally fused kernel; the index is read at the
    kernel's top level, outside any branch); default: every program."""
    if programs is None:
        pid, nprog = pl.program_id(0), pl.num_programs(0)
    else:
        pid, nprog = programs
    trips = (num_items - pid + nprog - 1) // nprog

    def step(i, carry):
        body(pid + i * nprog)
        return carry

    # A jnp carry: the Triton lowering cannot yield a Python int (see notes).
    lax.fori_loop(0, jnp.maximum(trips, 0), step, jnp.int32(0))


def triton_params(num_warps: int = 4, num_stages: int = 2) -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_interpret_params() -> Any:
    """Mosaic GPU's CPU interpreter parameters (private in jax 0.10, public in 0.11).

    This is the one place that touches the private module, so an API move breaks here.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    params_cls = getattr(plgpu, "InterpretGPUParams", None)
    if params_cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params_cls = InterpretGPUParams
    # NaN-filled fresh buffers: an output element the kernel never writes fails tests.
    return params_cls(uninitialized_memory="nan")


def reset_mosaic_interpreter() -> None:
    """The interpreter keeps global state that an exception leaves dirty; clear it."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()
