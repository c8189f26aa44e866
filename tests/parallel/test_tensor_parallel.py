"""Tensor parallelism on 4 host CPU devices: runs the `host_devices/` tests in a subprocess.

The subprocess's own output (which case failed and why) is shown when it fails."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import run_on_host_devices


def _check(result) -> None:
    assert result.returncode == 0, f"pytest on host devices failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


def test_tensor_parallel_on_four_host_devices():
    _check(run_on_host_devices("tests/parallel/host_devices", "-m", "not slow"))


@pytest.mark.slow
def test_default_model_and_pallas_kernels_on_host_devices():
    """The default model at TP=3, and the Pallas kernels (interpreted) inside the map."""
    _check(run_on_host_devices("tests/parallel/host_devices", "-m", "slow"))
