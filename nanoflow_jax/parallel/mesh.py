"""The tensor-parallel mesh: one axis, "tp", over N devices, and the checks that N fits.

N must divide the query heads and the MLP width (every device gets an equal share), and
the KV heads must split evenly (num_kv_heads % N == 0) or each KV head must serve a whole
group of devices (N % num_kv_heads == 0: the KV head is then kept on every device of its
group). N may not exceed the devices present (all processes' devices in a multi-host run).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from nanoflow_jax.config import ModelConfig

TP_AXIS = "tp"
HOST_DEVICES_FLAG = "XLA_FLAGS=--xla_force_host_platform_device_count"


def check_size(n: object) -> int:
    """A tensor-parallel size must be an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer (devices per model), got {n!r}")
    return n


def _problem(n: int, cfg: ModelConfig) -> str | None:
    """What N does not split in this model, or None."""
    if cfg.num_heads % n:
        return f"must divide num_attention_heads={cfg.num_heads}"
    if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
        return (f"and num_key_value_heads={cfg.num_kv_heads}: one must divide the other (KV heads are split, "
                f"or kept on every device of a group)")
    if cfg.intermediate_size % n:
        return f"must divide intermediate_size={cfg.intermediate_size}"
    return None


def allowed_sizes(cfg: ModelConfig) -> list[int]:
    """Every tensor-parallel size this model splits evenly."""
    return [n for n in range(1, cfg.num_heads + 1) if _problem(n, cfg) is None]


def check_model(n: int, cfg: ModelConfig) -> None:
    """Raise a ValueError naming the model dimension that N does not split, and the sizes that do."""
    check_size(n)
    problem = _problem(n, cfg)
    if problem is not None:
        sizes = [str(s) for s in allowed_sizes(cfg)]
        choice = sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + f" or {sizes[-1]}"
        raise ValueError(f"tensor_parallel_size={n} {problem}; use {choice}")


def check_devices(n: int) -> None:
    """Raise a ValueError when fewer than N devices are present."""
    check_size(n)
    count = jax.device_count()
    if n > count:
        hint = (f" (on CPU, set {HOST_DEVICES_FLAG}={n} before jax is imported)"
                if jax.default_backend() == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={n} needs {n} devices, but only {count} "
                         f"{jax.default_backend()} device{'s are' if count != 1 else ' is'} present{hint}")


def make_mesh(n: int) -> Mesh:
    """A 1-D mesh over the first N devices (every process's, in a multi-host run)."""
    check_devices(n)
    return Mesh(np.array(jax.devices()[:n]), (TP_AXIS,))
