"""Orbax checkpoints of the parameter pytree, with the config beside them."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.params import Params
from nanoflow_jax.weights.errors import WeightLoadError

MARKER = "nanoflow_orbax.json"


def is_orbax_folder(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).exists()


def save_orbax(params: Params, cfg: ModelConfig, path: str | Path) -> Path:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", params, force=True)
    with open(path / MARKER, "w") as f:
        json.dump({"config": cfg.to_hf_dict()}, f, indent=2)
    return path


def load_orbax(path: str | Path) -> tuple[ModelConfig, Params]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_orbax_folder(path):
        raise WeightLoadError(f"{path} is not a nanoflow_jax Orbax checkpoint (no {MARKER})")
    with open(path / MARKER) as f:
        cfg = ModelConfig.from_hf_dict(json.load(f)["config"])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path / "params")
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
        params = ckpt.restore(path / "params", target)
    return cfg, params
