"""`load_model`: one entry point for every way of naming a model.

`model` may be None (the default SmolLM2-135M-Instruct GGUF), a .gguf file, a Hugging
Face folder, a nanoflow_jax Orbax folder, or a shipped config name (with weights="random").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ConfigError, ModelConfig, available_configs
from nanoflow_jax.models.params import Params, cast_params, check_params, init_params, resolve_dtype
from nanoflow_jax.weights.errors import WeightLoadError

WEIGHT_SOURCES = ("auto", "random")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Params
    tokenizer: Any | None  # nanoflow_jax.tokenizer.Tokenizer, None for random configs


# Where each parameter goes, given the model's config: a tree like param_shapes(cfg) of
# shardings (tensor parallelism: parallel/sharding.py), or None for the default device.
Placement = Callable[[ModelConfig], Any] | None


def _to_device(host_params: Params, dtype: jnp.dtype, cfg: ModelConfig, placement: Placement = None) -> Params:
    # Cast on the host first so a bf16 model never holds an f32 copy on the device.
    if placement is None:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a.astype(dtype)), host_params)
    # Each device receives only its own slice of every tensor.
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a.astype(dtype), s), host_params, placement(cfg))


def _random(cfg: ModelConfig, seed: int, dt: jnp.dtype, placement: Placement) -> Params:
    return init_params(cfg, jax.random.key(seed), dt, shardings=None if placement is None else placement(cfg))


def load_model(model: str | Path | None = None, weights: str = "auto", dtype: str = "float32",
               seed: int = 0, progress: bool = True, placement: Placement = None) -> LoadedModel:
    """Load config, parameters and tokenizer for `model` (see module docstring).

    `placement` puts GGUF, Hugging Face and random weights straight onto their devices,
    split, so a model larger than one device's memory loads (Orbax folders restore whole)."""
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights must be one of {WEIGHT_SOURCES}, got {weights!r}")
    dt = resolve_dtype(dtype)
    if model is None:
        from nanoflow_jax.download import default_model_path

        model = default_model_path()
    path = Path(model).expanduser()

    if path.is_file():
        return _load_gguf(path, weights, dt, seed, progress, placement)
    if path.is_dir():
        return _load_folder(path, weights, dt, seed, placement)
    if str(model) in available_configs():
        if weights != "random":
            raise WeightLoadError(
                f"{model!r} is a config name with no weights on disk: pass --weights random "
                "(benchmarks) or --model PATH to a GGUF file / Hugging Face folder")
        cfg = ModelConfig.from_name(str(model))
        return LoadedModel(cfg, _random(cfg, seed, dt, placement), None)
    raise WeightLoadError(
        f"model {str(model)!r} not found: pass a .gguf file, a Hugging Face folder "
        f"(config.json + *.safetensors), an Orbax folder, or a config name ({', '.join(available_configs())})")


def _load_gguf(path: Path, weights: str, dt: jnp.dtype, seed: int, progress: bool,
               placement: Placement = None) -> LoadedModel:
    from nanoflow_jax.weights.gguf_loader import read_gguf_model

    cfg, tokenizer, host_params = read_gguf_model(path, with_params=weights != "random", progress=progress)
    if host_params is None:
        return LoadedModel(cfg, _random(cfg, seed, dt, placement), tokenizer)
    return LoadedModel(cfg, _to_device(host_params, dt, cfg, placement), tokenizer)


def _load_folder(path: Path, weights: str, dt: jnp.dtype, seed: int, placement: Placement = None) -> LoadedModel:
    from nanoflow_jax.weights.orbax_io import is_orbax_folder, load_orbax
    from nanoflow_jax.weights.safetensors_io import config_from_hf_folder, is_hf_folder, load_hf_params

    tokenizer = None
    if (path / "tokenizer.json").exists():
        from nanoflow_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    if is_orbax_folder(path):
        cfg, params = load_orbax(path)
        return LoadedModel(cfg, cast_params(params, dt), tokenizer)
    if is_hf_folder(path) or (weights == "random" and (path / "config.json").exists()):
        cfg = config_from_hf_folder(path)
        if weights == "random":
            return LoadedModel(cfg, _random(cfg, seed, dt, placement), tokenizer)
        return LoadedModel(cfg, _to_device(load_hf_params(path, cfg), dt, cfg, placement), tokenizer)
    raise WeightLoadError(
        f"{path} is neither a Hugging Face folder (config.json + model.safetensors or "
        "model.safetensors.index.json) nor a nanoflow_jax Orbax folder")


def from_params(params: Params, config: ModelConfig, dtype: str | None = None,
                tokenizer: Any | None = None) -> LoadedModel:
    """Wrap in-memory parameters (e.g. from a Flax training loop) after checking their shapes."""
    try:
        check_params(params, config)
    except ValueError as e:
        raise WeightLoadError(str(e)) from e
    return LoadedModel(config, cast_params(params, dtype) if dtype else params, tokenizer)


__all__ = ["LoadedModel", "load_model", "from_params", "WeightLoadError", "ConfigError"]
