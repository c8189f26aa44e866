"""A Flax module whose `params` collection IS the engine's parameter pytree.

A training repo builds `LlamaForCausalLM(config)`, trains it with optax as usual, then
hands `variables["params"]` straight to `nanoflow_jax.LLM(params=..., config=...)`:
no conversion, no file round trip.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.models.params import init_tree, param_shapes


class LlamaForCausalLM(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (float32)."""

    config: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        params = {
            name: self.param(name, lambda key, s=shapes, n=name: init_tree(s, key, self.param_dtype, prefix=n))
            for name, shapes in param_shapes(self.config).items()
        }
        return forward_dense(params, tokens, self.config)
