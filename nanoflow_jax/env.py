"""Every environment variable nanoflow_jax reads: its name, default and meaning, and a typed getter.

Values are read when used, not at import, so a script or test may set them late. An
empty value counts as unset. `python -m nanoflow_jax.env` prints each one with its value.
This module imports nothing heavy (no jax), so anything may import it first.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str
    default: str   # as a reader sees it (README table, `python -m nanoflow_jax.env`)
    meaning: str

    def raw(self) -> str | None:
        """The value as set, stripped; None when unset or empty."""
        value = os.environ.get(self.name, "").strip()
        return value or None


JAX_CACHE = EnvVar(
    "NANOFLOW_JAX_CACHE", "~/.cache/nanoflow_jax",
    "cache folder: the default model is downloaded here and JAX's compilation cache lives in its xla/")
COMPILATION_CACHE = EnvVar(
    "NANOFLOW_COMPILATION_CACHE", "$NANOFLOW_JAX_CACHE/xla",
    "JAX's persistent compilation cache folder, when it should live apart from the model cache")
ASYNC = EnvVar(
    "NANOFLOW_ASYNC", "1",
    "0 turns off async host scheduling (the host prepares iteration i+1 while the device runs i); "
    "EngineConfig.async_scheduling overrides it")
GEMM_TABLE = EnvVar(
    "NANOFLOW_GEMM_TABLE", "none (the committed tiles)",
    "a GEMM tile table written by the benchmarks' GEMM tuner; replaces the committed tile choices "
    "for the matrix sizes it covers")
BENCH_TIMING = EnvVar(
    "NANOFLOW_BENCH_TIMING", "slope",
    "how the benchmarks time a kernel: slope (difference of 2n and n calls, cancelling launch cost), "
    "ordered, or patched")
TEST_GPU = EnvVar(
    "NANOFLOW_TEST_GPU", "0 (CPU only)",
    "1 lets the tests see the GPU and run the `gpu`-marked ones; otherwise they run on the CPU")
COORDINATOR_ADDRESS = EnvVar(
    "NANOFLOW_COORDINATOR_ADDRESS", "unset (one process)",
    "host:port of process 0 in a multi-host run (jax.distributed); --coordinator-address overrides it")
NUM_PROCESSES = EnvVar(
    "NANOFLOW_NUM_PROCESSES", "unset (JAX's cluster detection)",
    "processes of a multi-host run, one per host; --num-processes overrides it")
DEVICE_MEMORY = EnvVar(
    "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90 under the command lines (JAX's own 0.75 when imported as a library)",
    "the share of each GPU's memory JAX reserves; the KV pool is sized from what it leaves free")
PROCESS_ID = EnvVar(
    "NANOFLOW_PROCESS_ID", "unset (JAX's cluster detection)",
    "this process's index in [0, NANOFLOW_NUM_PROCESSES); --process-id overrides it")

ALL: tuple[EnvVar, ...] = (JAX_CACHE, COMPILATION_CACHE, ASYNC, GEMM_TABLE, BENCH_TIMING, TEST_GPU,
                           COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID, DEVICE_MEMORY)

# What the command lines let JAX reserve, as vLLM's gpu_memory_utilization does: JAX's own 0.75
# would leave a fifth of an H100 idle while the KV pool is smaller than it could be.
SERVING_MEMORY_FRACTION = "0.90"

BENCH_TIMING_MODES = ("slope", "ordered", "patched")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(var: EnvVar, default: bool) -> bool:
    value = var.raw()
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"${var.name}={value!r}: use 1 or 0")


def cache_dir() -> Path:
    """$NANOFLOW_JAX_CACHE, else ~/.cache/nanoflow_jax."""
    value = JAX_CACHE.raw()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "nanoflow_jax"


def compilation_cache_dir() -> Path:
    """$NANOFLOW_COMPILATION_CACHE, else the xla/ folder of the cache folder."""
    value = COMPILATION_CACHE.raw()
    return Path(value).expanduser() if value else cache_dir() / "xla"


def async_scheduling() -> bool:
    """$NANOFLOW_ASYNC (on unless 0)."""
    return _flag(ASYNC, True)


def gemm_table() -> str | None:
    """$NANOFLOW_GEMM_TABLE: path of a GEMM tile table, or None."""
    return GEMM_TABLE.raw()


def bench_timing() -> str:
    """$NANOFLOW_BENCH_TIMING, one of BENCH_TIMING_MODES (default slope)."""
    mode = BENCH_TIMING.raw() or "slope"
    if mode not in BENCH_TIMING_MODES:
        raise ValueError(f"${BENCH_TIMING.name}={mode!r}: use one of {', '.join(BENCH_TIMING_MODES)}")
    return mode


def gpu_tests_enabled() -> bool:
    """$NANOFLOW_TEST_GPU (off unless 1)."""
    return _flag(TEST_GPU, False)


def _int(var: EnvVar) -> int | None:
    value = var.raw()
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${var.name}={value!r}: use an integer") from None


def coordinator_address() -> str | None:
    """$NANOFLOW_COORDINATOR_ADDRESS (host:port), or None."""
    return COORDINATOR_ADDRESS.raw()


def num_processes() -> int | None:
    """$NANOFLOW_NUM_PROCESSES, or None."""
    return _int(NUM_PROCESSES)


def process_id() -> int | None:
    """$NANOFLOW_PROCESS_ID, or None."""
    return _int(PROCESS_ID)


def describe() -> str:
    """One line per variable: name, value in effect (or the default), meaning."""
    lines = []
    for var in ALL:
        value = var.raw()
        shown = f"={value}" if value is not None else f" (unset; default {var.default})"
        lines.append(f"{var.name}{shown}\n    {var.meaning}")
    return "\n".join(lines)


def claim_serving_memory() -> None:
    """Let JAX reserve SERVING_MEMORY_FRACTION of each GPU unless the user chose a share.

    For the command lines only (generate, serve, the benchmarks): a training repo that
    imports the library keeps its own setting. Effective only before JAX first touches
    a device, so call it at the top of `main`."""
    if DEVICE_MEMORY.raw() is None:
        os.environ[DEVICE_MEMORY.name] = SERVING_MEMORY_FRACTION


if __name__ == "__main__":
    print(describe())

