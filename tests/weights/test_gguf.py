"""GGUF loading: every supported quantization, the Q/K permutation, and bad files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.models.params import init_params
from nanoflow_jax.weights import WeightLoadError
from nanoflow_jax.weights.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
from tests.weights.tiny_gguf import write_tiny_gguf

CFG = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4)
# Relative error of the dequantized weights (measured ~ half of these bounds).
QTYPE_TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_1": 0.12, "Q4_0": 0.15}


@pytest.fixture
def params():
    return jax.device_get(init_params(CFG, jax.random.key(np.random.randint(1 << 30))))


def _load(path):
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    return cfg, load_gguf_params(reader, cfg, progress=False)


@pytest.mark.parametrize("qtype", sorted(QTYPE_TOL))
def test_quantizations_round_trip(tmp_path, params, qtype):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, params, CFG, qtype)
    cfg, loaded = _load(path)
    assert cfg.num_heads == 4 and cfg.num_kv_heads == 2 and cfg.tie_word_embeddings is False
    for key in ("wq", "wk", "w_down"):
        ref, got = params["layers"][key], loaded["layers"][key]
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel <= QTYPE_TOL[qtype] + 1e-7, (key, rel)
    if qtype in ("F32", "F16"):  # the permutation was undone: logits agree
        tokens = jnp.asarray(np.random.randint(0, 96, (1, 12)))
        a = forward_dense(params, tokens, CFG)
        b = forward_dense(jax.tree_util.tree_map(jnp.asarray, loaded), tokens, cfg)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3 if qtype == "F16" else 1e-5)


def test_truncated_file(tmp_path, params):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, params, CFG)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="truncated or corrupt"):
        _load(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(WeightLoadError, match="not a GGUF file"):
        open_gguf(path)
    with pytest.raises(WeightLoadError, match="not found"):
        open_gguf(tmp_path / "missing.gguf")


def test_missing_tensor(tmp_path, params):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, params, CFG, drop="blk.1.ffn_up.weight")
    with pytest.raises(WeightLoadError, match="lacks tensor 'blk.1.ffn_up.weight'"):
        _load(path)


def test_shape_mismatch(tmp_path, params):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, params, CFG, override_ffn=128)
    with pytest.raises(WeightLoadError, match="has shape .* expected"):
        _load(path)


def test_unknown_architecture(tmp_path, params):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, params, CFG, arch="falcon")
    with pytest.raises(WeightLoadError, match="unsupported GGUF architecture 'falcon'"):
        _load(path)
