"""nanoflow_jax: NanoFlow-style LLM serving in JAX and Pallas.

`from nanoflow_jax import LLM, SamplingParams`. The engine names are loaded lazily so
that importing a light submodule (e.g. `nanoflow_jax.config`) does not pull in the engine.
"""

from typing import Any

from nanoflow_jax.config import ModelConfig

_ENGINE_EXPORTS = ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "LLMEngine")

__all__ = ["ModelConfig", *_ENGINE_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _ENGINE_EXPORTS:
        from nanoflow_jax import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nanoflow_jax' has no attribute {name!r}")
