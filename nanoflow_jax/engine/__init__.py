"""The serving engine: paged KV cache, iteration-level scheduling, async host pipeline."""

from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.llm import LLM
from nanoflow_jax.engine.llm_engine import LLMEngine, RequestError
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
           "RequestError"]
