"""Hugging Face checkpoint folders: config.json + model.safetensors (or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanoflow_jax.config import ConfigError, ModelConfig
from nanoflow_jax.models.params import Params
from nanoflow_jax.weights import names
from nanoflow_jax.weights.errors import WeightLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and (
        (path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists())


def config_from_hf_folder(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_json(path / "config.json")
    except (ConfigError, KeyError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{path / 'config.json'}: {e}") from e


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the shard file that holds it."""
    if (path / INDEX_FILE).exists():
        with open(path / INDEX_FILE) as f:
            index = json.load(f)
        return {name: path / shard for name, shard in index["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(path / SINGLE_FILE), framework="flax") as f:
        return {name: path / SINGLE_FILE for name in f.keys()}


def load_hf_params(path: Path, cfg: ModelConfig) -> Params:
    from safetensors import safe_open

    wmap = _weight_map(path)
    handles: dict[Path, object] = {}

    def get(name: str) -> np.ndarray:
        shard = wmap.get(name)
        if shard is None:
            raise WeightLoadError(f"checkpoint {path} lacks tensor {name!r}")
        if shard not in handles:
            if not shard.exists():
                raise WeightLoadError(f"shard {shard.name} named in {INDEX_FILE} is missing")
            handles[shard] = safe_open(str(shard), framework="flax")
        return np.asarray(handles[shard].get_tensor(name))  # type: ignore[attr-defined]

    top = dict(names.HF_TOP)
    if cfg.tie_word_embeddings:
        top.pop("lm_head")
    return names.assemble(cfg, get, names.HF_LAYER, top)


def save_hf_folder(params: Params, cfg: ModelConfig, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face style folder (config.json + safetensors, sharded above max_shard_bytes)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    tensors = {k: np.ascontiguousarray(v) for k, v in names.export(params, cfg, names.HF_LAYER, names.HF_TOP).items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_FILE))
        return path
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname))
        weight_map.update({name: fname for name in shard})
    with open(path / INDEX_FILE, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return path
