"""Multi-host start-up: one controller process per host, joined by `jax.distributed.initialize`.

Every process runs the same program (the same `LLM`, the same prompts): JAX's
multi-controller runtime then treats all hosts' devices as one set (`jax.devices()`), so
a tensor-parallel mesh (`parallel/mesh.py`) may span hosts and the step's all-reduces
cross the network. The coordinator's address and this process's count and index come
from the arguments (the command line's `--coordinator-address`, `--num-processes`,
`--process-id`), else from $NANOFLOW_COORDINATOR_ADDRESS, $NANOFLOW_NUM_PROCESSES and
$NANOFLOW_PROCESS_ID, else from JAX itself ($JAX_COORDINATOR_ADDRESS, or the cluster it
detects: SLURM, Open MPI, Kubernetes ...). It must run before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from nanoflow_jax import env


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """What `jax.distributed.initialize` is given; None leaves a value to JAX's detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None:
            if self.process_id < 0:
                raise ValueError(f"process_id must be >= 0, got {self.process_id}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(f"process_id={self.process_id} must be below num_processes={self.num_processes} "
                                 f"(processes are numbered 0 .. {self.num_processes - 1})")
        address = self.coordinator_address
        if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"coordinator_address must be host:port (process 0's host), got {address!r}")

    @property
    def requested(self) -> bool:
        """Whether a multi-host run is asked for (by us or by JAX's own variable)."""
        return (any(v is not None for v in dataclasses.astuple(self))
                or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> DistributedConfig:
    """Arguments first, then the NANOFLOW_* variables (each value on its own)."""
    return DistributedConfig(
        coordinator_address=coordinator_address if coordinator_address is not None else env.coordinator_address(),
        num_processes=num_processes if num_processes is not None else env.num_processes(),
        process_id=process_id if process_id is not None else env.process_id())


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-host run if one is asked for; False (and nothing done) otherwise.

    Call it once, first: JAX refuses once a device has been used."""
    cfg = resolve(coordinator_address, num_processes, process_id)
    if not cfg.requested:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
    return True
