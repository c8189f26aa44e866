"""Stream regions: run a function on another GPU stream inside one jitted program.

`on_stream(f, 1)` wraps f in `compute_on("gpu_stream:1")`, so XLA launches its kernels on
a second CUDA stream and a kernel of the main stream can run at the same time (each on
its share of the SMs: the kernels' `num_programs`). The region must hold bare kernels
(a `pallas_call`, plain lax ops): a nested jitted function inside fails to compile
("No ExecutionStreamId found for call-start"). On other backends the function runs as
it is: the same graph, streams ignored.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from jax.experimental import compute_on as _compute_on

F = TypeVar("F", bound=Callable)
# jax 0.10 names the function form compute_on2 (compute_on is a context manager there);
# from jax 0.11 compute_on is the function form.
_region = getattr(_compute_on, "compute_on2", None) or _compute_on.compute_on


def streams_supported() -> bool:
    return jax.default_backend() == "gpu"


def on_stream(fn: F, stream: int) -> F:
    """fn on GPU stream `stream` (>= 1; 0 is the main stream: fn unchanged)."""
    if stream < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    if stream == 0 or not streams_supported():
        return fn
    return _region(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)
