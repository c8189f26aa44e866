"""nanoflow_jax.env: the one place environment variables are read."""

import pytest

from nanoflow_jax import env


def test_cache_folders_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(env.JAX_CACHE.name, str(tmp_path))
    monkeypatch.delenv(env.COMPILATION_CACHE.name, raising=False)
    assert env.cache_dir() == tmp_path
    # The compilation cache moves with the model cache unless it is set on its own.
    assert env.compilation_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv(env.COMPILATION_CACHE.name, str(tmp_path / "elsewhere"))
    assert env.compilation_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(env.JAX_CACHE.name)
    monkeypatch.setenv(env.COMPILATION_CACHE.name, "")  # empty counts as unset
    assert env.cache_dir().name == "nanoflow_jax"
    assert env.compilation_cache_dir() == env.cache_dir() / "xla"


def test_flags_and_modes_reject_unknown_values(monkeypatch):
    monkeypatch.setenv(env.ASYNC.name, "off")
    assert env.async_scheduling() is False
    monkeypatch.setenv(env.ASYNC.name, "maybe")
    with pytest.raises(ValueError, match="NANOFLOW_ASYNC='maybe'"):
        env.async_scheduling()
    monkeypatch.delenv(env.ASYNC.name)
    assert env.async_scheduling() is True
    monkeypatch.setenv(env.BENCH_TIMING.name, "fastest")
    with pytest.raises(ValueError, match="NANOFLOW_BENCH_TIMING"):
        env.bench_timing()


def test_describe_lists_every_variable(monkeypatch):
    monkeypatch.setenv(env.GEMM_TABLE.name, "/tmp/table.json")
    text = env.describe()
    assert all(var.name in text for var in env.ALL)
    assert "NANOFLOW_GEMM_TABLE=/tmp/table.json" in text


def test_command_lines_claim_serving_memory_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(env.DEVICE_MEMORY.name, raising=False)
    env.claim_serving_memory()
    assert float(env.DEVICE_MEMORY.raw()) == pytest.approx(0.9)
    monkeypatch.setenv(env.DEVICE_MEMORY.name, "0.5")
    env.claim_serving_memory()
    assert env.DEVICE_MEMORY.raw() == "0.5"
