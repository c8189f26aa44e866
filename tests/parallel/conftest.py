"""Multi-device tests run in a subprocess with host CPU devices (`host_devices/`).

The main pytest process has one CPU device, and XLA's device count is fixed when jax
starts, so `test_tensor_parallel.py` starts pytest again on `host_devices/` with
XLA_FLAGS=--xla_force_host_platform_device_count=4; a process with fewer devices skips
collecting that folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

HOST_DEVICES = 4
ROOT = Path(__file__).resolve().parents[2]

collect_ignore_glob = ["host_devices/*"] if jax.device_count() < HOST_DEVICES else []


def run_on_host_devices(*pytest_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """pytest in a fresh process that sees HOST_DEVICES CPU devices."""
    environ = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={HOST_DEVICES}",
               "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
