"""Llama-family model: parameter pytree and pure forward functions."""
