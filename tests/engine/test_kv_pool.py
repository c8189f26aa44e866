"""engine.kv_pool.resolve_num_pages: the KV pool against the device memory JAX reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.kv_pool import DEFAULT_GPU_FRACTION, resolve_num_pages

CFG = ModelConfig.from_name("llama-3-8b")
PAGE = 2 * CFG.num_layers * 16 * CFG.num_kv_heads * CFG.head_dim * 2   # bf16 bytes a page


class _Device:
    def __init__(self, limit: int, in_use: int) -> None:
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self) -> dict:
        return self.stats


def _on_device(monkeypatch, limit: int, in_use: int) -> None:
    monkeypatch.setattr(jax, "local_devices", lambda: [_Device(limit, in_use)])


def _engine(**kw) -> EngineConfig:
    return EngineConfig(max_model_len=1536, max_num_seqs=256, max_num_batched_tokens=2048, **kw)


def test_an_explicit_pool_larger_than_free_memory_is_refused_with_the_fix(monkeypatch):
    rng = np.random.default_rng()
    limit, in_use = int(rng.integers(60, 80)) << 30, int(rng.integers(10, 20)) << 30
    _on_device(monkeypatch, limit, in_use)
    fits = (limit - in_use) // PAGE
    assert resolve_num_pages(_engine(num_kv_pages=fits), CFG, jnp.bfloat16, lambda s: [0] * len(s)) == fits
    with pytest.raises(ValueError, match=rf"num_kv_pages={fits + 1} needs .* at most {fits} pages.*"
                                         "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        resolve_num_pages(_engine(num_kv_pages=fits + 1), CFG, jnp.bfloat16, lambda s: [0] * len(s))


def test_the_automatic_pool_leaves_room_for_the_step_scratch(monkeypatch):
    rng = np.random.default_rng()
    limit, in_use = int(rng.integers(60, 80)) << 30, int(rng.integers(10, 20)) << 30
    base, slope = int(rng.integers(1, 2 << 30)), int(rng.integers(0, 4096))
    _on_device(monkeypatch, limit, in_use)
    n = resolve_num_pages(_engine(), CFG, jnp.bfloat16, lambda sizes: [base + slope * p for p in sizes])
    budget = (limit - in_use) * DEFAULT_GPU_FRACTION
    assert n * (PAGE + slope) + base <= budget < (n + 1) * (PAGE + slope) + base


def test_an_fp8_cache_holds_twice_the_pages_of_bf16(monkeypatch):
    """kv_cache_dtype="fp8": one byte an element, so the same memory holds twice the pages."""
    from nanoflow_jax.models.paged import kv_cache_dtype

    rng = np.random.default_rng()
    limit, in_use = int(rng.integers(60, 80)) << 30, int(rng.integers(10, 20)) << 30
    _on_device(monkeypatch, limit, in_use)
    fp8 = kv_cache_dtype(_engine(kv_cache_dtype="fp8").kv_cache_dtype, jnp.bfloat16)
    assert fp8 == jnp.float8_e4m3fn and kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    n_bf16 = resolve_num_pages(_engine(), CFG, jnp.bfloat16, lambda s: [0] * len(s))
    n_fp8 = resolve_num_pages(_engine(kv_cache_dtype="fp8"), CFG, fp8, lambda s: [0] * len(s))
    assert n_fp8 in (2 * n_bf16, 2 * n_bf16 + 1)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .*'fp8'.*got 'int8'"):
        _engine(kv_cache_dtype="int8")


def test_reserved_bytes_come_off_free_memory_first(monkeypatch):
    """The offload staging ring's bytes are set aside before the pool takes its share."""
    rng = np.random.default_rng()
    limit, in_use = int(rng.integers(60, 80)) << 30, int(rng.integers(10, 20)) << 30
    reserved = int(rng.integers(1, 256)) * PAGE
    _on_device(monkeypatch, limit, in_use)
    n = resolve_num_pages(_engine(), CFG, jnp.bfloat16, lambda s: [0] * len(s), reserved)
    assert n == int((limit - in_use - reserved) * DEFAULT_GPU_FRACTION // PAGE)
    fits = (limit - in_use - reserved) // PAGE
    with pytest.raises(ValueError, match=f"at most {fits} pages"):
        resolve_num_pages(_engine(num_kv_pages=fits + 1), CFG, jnp.bfloat16, lambda s: [0] * len(s), reserved)
