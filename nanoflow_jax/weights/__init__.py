"""Weight loaders: GGUF, Hugging Face safetensors, Orbax, in-memory pytrees, random."""

from nanoflow_jax.weights.errors import WeightLoadError

__all__ = ["WeightLoadError"]
