"""Device timing of one function's calls, the way every benchmark here measures.

`device_ms` runs a jitted program of many calls and reports the time per call. How the
calls are strung together matters more than it looks (H200, jax 0.11.2; bench/RESULTS.md,
"Answered questions"):
- patching one element of the previous output into the next call's input ("patched")
  costs a custom call (our Pallas kernels) a copy of that input which a fused XLA op
  avoids: a 48 us GEMM timed at 69-71 us patched against 59 us unpatched;
- each program run carries a fixed launch cost, about 10 us a call at 10 calls, which
  the "slope" mode cancels by differencing programs of 2 x reps and reps calls.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from nanoflow_jax import env

WARMUP_MS = 100.0  # busy time before sampling, so the GPU is at its working clocks
TIMING_ENV = env.BENCH_TIMING.name
TIMING_MODES = env.BENCH_TIMING_MODES
L2_BYTES = 60 << 20  # H100/H200 L2 cache (50 MB on the H100 SXM, 60 MB on the H200)


def timing_mode() -> str:
    """How device_ms strings together calls that thread no state ($NANOFLOW_BENCH_TIMING):
    "slope" (default): ordered programs of 2 x reps and reps calls, differenced;
    "ordered": one ordered program (see `chained`), its mean; "patched": each call's
    first argument patched from the previous output (slower for custom calls: kept to
    compare with results timed that way)."""
    return env.bench_timing()


def warm_up(call: Callable[[], Any], sync: Callable[[Any], Any], warmup_ms: float) -> None:
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
    warm_up(lambda: fn(*args), jax.block_until_ready, warmup_ms)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(samples)


def torch_time(torch: Any, fn: Callable[[], Any], iters: int = 20, repeats: int = 5) -> float:
    """time_fn for PyTorch calls, with CUDA events."""
    warm_up(fn, lambda _: torch.cuda.synchronize(), WARMUP_MS)
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


def chained(fn: Callable[..., Any], reps: int, thread: int = 0,
            rotate: tuple[int, ...] = (), ordered: bool = False) -> Callable[..., Any]:
    """One jitted program of `reps` calls of fn, to time device work alone.

    Back-to-back jitted calls of a ~20 us kernel measure Python dispatch, not the GPU.
    ordered (thread=0): call i's arguments pass through an optimization barrier with
    call i-1's output, so XLA can neither merge, fuse nor reorder the calls, and no input
    is touched; every output is returned, so none is dropped.
    Otherwise, thread=0: each call's first argument gets one element of the previous
    output patched in; thread=k: the k outputs replace the first k arguments (in-place
    cache kernels).
    rotate: positions of arguments passed as a tuple of copies; call i takes copy
    i % len, so operands smaller than the L2 cache are not re-read from it (in a model
    each layer's weights come from HBM), and identical calls cannot be merged.
    fn is jitted once, so its reps calls are traced and lowered once (a Mosaic GPU
    kernel lowered per call made a 20-call program take ~10 s to compile).
    """
    fn = jax.jit(fn)

    def run(*args: Any) -> Any:
        args = list(args)
        copies = {i: args[i] for i in rotate}
        out, outs = None, []
        for rep in range(reps):
            for i, c in copies.items():
                args[i] = c[rep % len(c)]
            if ordered and out is not None:
                args = list(lax.optimization_barrier((tuple(args), out))[0])
            out = fn(*args)
            outs.append(out)
            if ordered:
                continue
            if thread:
                args[:thread] = list(out) if thread > 1 else [out]
            else:
                leaf = jax.tree.leaves(out)[0].reshape(-1)[:1]
                a0 = args[0]
                patch = leaf.astype(a0.dtype).reshape((1,) * a0.ndim)
                args[0] = lax.dynamic_update_slice(a0, patch, (0,) * a0.ndim)
        return tuple(outs) if ordered else out

    return jax.jit(run)


def timed_program(fn: Callable[..., Any], args: tuple[Any, ...], reps: int, thread: int = 0,
                  rotate: tuple[int, ...] = (), mode: str = "ordered") -> tuple[Callable[..., Any], tuple]:
    """The program device_ms times for `mode` and its arguments: ordered programs take
    `reps` distinct copies of the first argument (no two calls alike, whatever the
    compiler drops the barriers before)."""
    if thread or mode == "patched":
        return chained(fn, reps, thread, rotate), tuple(args)
    args, rotate = _distinct_firsts(args, rotate, reps)
    return chained(fn, reps, rotate=rotate, ordered=True), args


def _distinct_firsts(args: tuple[Any, ...], rotate: tuple[int, ...],
                     n: int) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """args with n copies of the first argument, rotated through by the calls."""
    if 0 in rotate:
        raise ValueError("the first argument is rotated by device_ms itself: rotate others")
    return (copies_of(args[0], n),) + tuple(args[1:]), (0,) + tuple(rotate)


def device_ms(fn: Callable[..., Any], *args: Any, reps: int = 10, thread: int = 0,
              repeats: int = 5, min_sample_ms: float = 3.0, rotate: tuple[int, ...] = (),
              mode: str | None = None) -> float:
    """Per-call device time (ms) of fn from programs of `reps` calls (timing_mode's
    choice unless `mode` is given; calls that thread state, thread > 0, are chained).

    Each sample runs a program enough times back to back to last at least
    `min_sample_ms`, so the one dispatch latency a sample cannot hide is a small share
    of it (3 runs of a 5-call chain of 40 us kernels would be 0.6 ms, ~10% latency).
    """
    mode = mode or timing_mode()
    if mode != "slope" or thread:
        run, a = timed_program(fn, args, reps, thread, rotate, mode)
        return _program_ms(run, a, min_sample_ms, repeats) / reps
    # One set of copies for both programs: the short one takes the first reps.
    args, rotate = _distinct_firsts(args, rotate, 2 * reps)
    short, long_ = (_program_ms(chained(fn, n, rotate=rotate, ordered=True), args, min_sample_ms, repeats)
                    for n in (reps, 2 * reps))
    # Noise can swamp the difference for kernels of a few us; the longer program's mean
    # (which still carries its launch cost) is then the honest upper bound.
    slope = (long_ - short) / reps
    return slope if slope > 0.25 * long_ / (2 * reps) else long_ / (2 * reps)


def _program_ms(run: Callable[..., Any], args: tuple[Any, ...], min_sample_ms: float,
                repeats: int) -> float:
    once = time_fn(run, *args, iters=1, repeats=1, warmup_ms=0.0)
    iters = max(3, min(200, int(min_sample_ms / max(once, 1e-3)) + 1))
    return time_fn(run, *args, iters=iters, repeats=repeats)


def cold_copies(nbytes: int) -> int:
    """Copies of an operand of nbytes to rotate through so that successive calls never
    find it in L2: together at least twice the L2 size (at most 8)."""
    return max(1, min(8, -(-2 * L2_BYTES // max(nbytes, 1))))


def copies_of(a: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """a and n - 1 copies of it in their own buffers (for `rotate`)."""
    return (a,) + tuple(jnp.array(a, copy=True) for _ in range(n - 1))
