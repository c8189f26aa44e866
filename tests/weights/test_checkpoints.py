"""Safetensors folders and Orbax checkpoints written from the default GGUF's weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.weights import WeightLoadError
from nanoflow_jax.weights.loader import load_model
from nanoflow_jax.weights.orbax_io import save_orbax
from nanoflow_jax.weights.safetensors_io import save_hf_folder


@pytest.fixture(scope="module")
def smollm2(default_gguf_path):
    return load_model(default_gguf_path, progress=False)


@pytest.fixture(scope="module")
def tokens(smollm2):
    return jnp.asarray([smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])


@pytest.fixture(scope="module")
def gguf_logits(smollm2, tokens):
    return np.asarray(forward_dense(smollm2.params, tokens, smollm2.config))


@pytest.mark.parametrize("shard_bytes", [None, 20_000_000])
def test_safetensors_folder_reproduces_gguf_logits(tmp_path, smollm2, tokens, gguf_logits, shard_bytes):
    folder = save_hf_folder(jax.device_get(smollm2.params), smollm2.config, tmp_path / "hf", shard_bytes)
    if shard_bytes:
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
        assert (folder / "model.safetensors.index.json").exists()
    loaded = load_model(folder)
    assert dataclasses.replace(loaded.config, name="") == dataclasses.replace(smollm2.config, name="")
    np.testing.assert_array_equal(np.asarray(forward_dense(loaded.params, tokens, loaded.config)), gguf_logits)


def test_safetensors_missing_tensor_and_shard(tmp_path, smollm2):
    folder = save_hf_folder(jax.device_get(smollm2.params), smollm2.config, tmp_path / "hf", 20_000_000)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(WeightLoadError, match="shard .* is missing"):
        load_model(folder)


def test_orbax_round_trip_is_exact(tmp_path, smollm2):
    save_orbax(smollm2.params, smollm2.config, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.num_layers == smollm2.config.num_layers
    for a, b in zip(jax.tree_util.tree_leaves(smollm2.params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_model_arguments(tmp_path):
    with pytest.raises(WeightLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(WeightLoadError, match="--weights random"):
        load_model("llama-3-8b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightLoadError, match="neither a Hugging Face folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(tmp_path, dtype="float8")


def test_random_weights_from_config_name():
    m = load_model("smollm2-135m", weights="random", dtype="bfloat16", seed=3)
    assert m.params["layers"]["wq"].dtype == jnp.bfloat16 and m.tokenizer is None
    assert m.params["layers"]["wq"].shape == (30, 576, 576)
