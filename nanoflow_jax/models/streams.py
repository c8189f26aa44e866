"""Stream regions: run a function on another GPU stream inside one jitted program.

`on_stream(f, 1)` wraps f in `compute_on("gpu_stream:1")`, so XLA launches its kernels on
a second CUDA stream and kernels of another stream can run at the same time (each on
its share of the SMs: the kernels' `num_programs`). `stream_group()` puts the regions
opened inside it into one XLA scheduling group: without it XLA places each region's
`call-done` right after its `call-start`, and nothing overlaps (bench/RESULTS.md,
"Overlap mechanism").

A region must be flat: XLA cannot give a stream to a nested computation inside it
("No ExecutionStreamId found for call-start"), and many jnp functions are themselves
jitted. `on_stream` therefore traces f and inlines every nested `jit` before the region
is built; a loop (`lax.scan`/`while`) inside a region is still refused by XLA. On other
backends the function runs as it is: the same graph, streams ignored.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.extend.core
from jax.experimental import compute_on as _compute_on

# jax 0.10 names the function form compute_on2 (compute_on is a context manager there);
# from jax 0.11 compute_on is the function form.
_region = getattr(_compute_on, "compute_on2", None) or _compute_on.compute_on
_CALLS = ("pjit", "jit", "closed_call", "core_call")


def streams_supported() -> bool:
    return jax.default_backend() == "gpu"


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate a jaxpr, descending into nested jit calls instead of binding them."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name in _CALLS:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = _eval_inlined(inner.jaxpr, inner.consts, invals)
        else:
            # (subfuns, params) on older jax, the params alone on newer.
            bound = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def inline_jits(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with every nested `jit` inlined (same values, a flat program)."""

    def flat(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_inlined(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
    return flat


def on_stream(fn: Callable[..., Any], stream: int) -> Callable[..., Any]:
    """fn on GPU stream `stream` (>= 1; 0 is the main stream: fn unchanged)."""
    if stream < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    if stream == 0 or not streams_supported():
        return fn
    return _region(inline_jits(fn), compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)


@contextlib.contextmanager
def stream_group(group: str = "nanoflow", enabled: bool = True) -> Iterator[None]:
    """Regions opened inside share one XLA scheduling group (all start, then all finish)."""
    if not (enabled and streams_supported()):
        yield
        return
    from jax.experimental.xla_metadata import set_xla_metadata

    with set_xla_metadata(_scheduling_group_id=group):
        yield


def step_compiler_options(pipeline: str) -> dict[str, Any] | None:
    """XLA options for a step of this pipeline: the overlapped one runs without XLA's CUDA
    graphs, which replay a region's kernels on one stream (bench/RESULTS.md)."""
    if pipeline != "nanoflow" or not streams_supported():
        return None
    return {"xla_gpu_enable_command_buffer": ""}
