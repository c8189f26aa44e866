"""Multi-host start-up: where the coordinator and process numbers come from, bad values, and a
real 2-process run on loopback (gloo CPU collectives) that serves the model over both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nanoflow_jax.parallel import distributed
from tests.parallel.conftest import ROOT

VARS = ("NANOFLOW_COORDINATOR_ADDRESS", "NANOFLOW_NUM_PROCESSES", "NANOFLOW_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nothing_asked_is_one_process(clean_env):
    assert not distributed.resolve().requested
    assert distributed.initialize() is False


def test_arguments_override_the_environment(clean_env):
    clean_env.setenv("NANOFLOW_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("NANOFLOW_NUM_PROCESSES", "4")
    clean_env.setenv("NANOFLOW_PROCESS_ID", "3")
    assert distributed.resolve() == distributed.DistributedConfig("10.0.0.1:1234", 4, 3)
    assert distributed.resolve(process_id=1).process_id == 1
    assert distributed.resolve("h:99").coordinator_address == "h:99"


def test_jax_own_variable_asks_for_a_multi_host_run(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.resolve().requested


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=2), r"process_id=2 must be below num_processes=2 \(processes are numbered 0 .. 1\)"),
    (dict(num_processes=0), "num_processes must be >= 1"),
    (dict(process_id=-1), "process_id must be >= 0"),
    (dict(coordinator_address="localhost"), "coordinator_address must be host:port"),
])
def test_bad_values_are_clear(clean_env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve(**kwargs)


def test_bad_environment_value_names_the_variable(clean_env):
    clean_env.setenv("NANOFLOW_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"\$NANOFLOW_NUM_PROCESSES='two': use an integer"):
        distributed.resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback_share_one_mesh():
    """Each process has one CPU device; the mesh spans both, a psum crosses processes, and the
    engine split over both gives forward_dense's greedy tokens (computed here, on one device)."""
    from tests.engine.conftest import reference_greedy
    from tests.parallel.multihost_worker import MAX_TOKENS, PROMPTS

    base = {k: v for k, v in os.environ.items() if k not in VARS and k != "XLA_FLAGS"}
    base.update(JAX_PLATFORMS="cpu", NANOFLOW_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                NANOFLOW_NUM_PROCESSES="2", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.multihost_worker"], cwd=ROOT,
                              env={**base, "NANOFLOW_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        want = reference_greedy(PROMPTS, MAX_TOKENS)
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    seen = []
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(s["process"] for s in seen) == [0, 1]
    for s in seen:
        assert s["joined"] and (s["processes"], s["devices"], s["local_devices"]) == (2, 2, 1)
        assert s["psum"] == 0.0 + 1.0
        assert s["cache_devices"] == 2
        assert s["split"] == want
