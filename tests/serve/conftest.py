"""A real server as a subprocess on 127.0.0.1 (the default model, small engine settings),
shared by the tests of this folder; `start_server` also serves tests that need their own."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Small buckets and pool so the CPU compiles little: 127 usable pages of 16 tokens.
ENGINE_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                "--num-kv-pages", "128"]
NUM_USABLE_PAGES = 127


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(*flags: str, ready_timeout: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m nanoflow_jax.serve` on a free port; yields (base URL, process) once /health answers."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoflow_jax.serve", "--port", str(port), "--log-level",
                             "warning", *ENGINE_FLAGS, *flags], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.25)
        proc.log_path = log.name   # type: ignore[attr-defined]
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def server(default_gguf_path) -> Iterator[str]:
    """The shared server's base URL."""
    with start_server() as (url, _):
        yield url


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value} (comment lines dropped)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every page is free; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["nanoflow_num_requests_running"] == 0 and m["nanoflow_num_requests_waiting"] == 0
                and m["nanoflow_kv_pages_free"] == NUM_USABLE_PAGES):
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)
