"""Engine test fixtures: a tiny random Llama, a byte-level tokenizer and a dense reference.

Every engine here uses the same shapes (ENGINE_KW), so the step buckets compile once per
session (later LLMs hit JAX's in-process cache) and the suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.models.params import init_params

VOCAB = 260  # 256 byte tokens + 4 specials
IM_START, IM_END = 256, 257
TINY = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                   eos_token_id=IM_END)
# 47 usable pages of 4 tokens: one request always fits, sixteen at once do not (preemption).
ENGINE_KW: dict[str, Any] = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                                 block_size=4, num_kv_pages=48, show_progress=False)
REF_LEN = 128  # forward_dense runs on right-padded [B, REF_LEN] so it compiles once
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

COMPILE_EVENTS: list[str] = []
_COUNTING = [False]


def _on_event(event: str, duration: float, **kwargs: Any) -> None:
    if _COUNTING[0] and ("compile" in event or "trace" in event):
        COMPILE_EVENTS.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


class count_compiles:
    """Context manager: the JAX trace/compile events that happened inside it."""

    def __enter__(self) -> list[str]:
        COMPILE_EVENTS.clear()
        _COUNTING[0] = True
        return COMPILE_EVENTS

    def __exit__(self, *exc: Any) -> None:
        _COUNTING[0] = False


@functools.lru_cache(maxsize=None)
def tiny_params(seed: int = 0) -> Any:
    return init_params(TINY, jax.random.key(seed), "float32")


def byte_tokenizer() -> Any:
    """Byte-level BPE without merges: one token per UTF-8 byte (multi-byte characters span tokens)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from nanoflow_jax.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad2>", "<pad3>"])
    return Tokenizer(backend, bos_token_id=None, eos_token_id=IM_END, chat_template=CHATML)


def make_llm(params: Any = None, tokenizer: Any = None, **overrides: Any) -> Any:
    from nanoflow_jax import LLM

    kw = {**ENGINE_KW, **overrides}
    return LLM(params=tiny_params() if params is None else params, config=TINY, tokenizer=tokenizer, **kw)


@functools.lru_cache(maxsize=None)
def _dense_logits_fn() -> Any:
    return jax.jit(lambda p, t: forward_dense(p, t, TINY))


def reference_greedy(prompts: list[list[int]], max_tokens: int, params: Any = None) -> list[list[int]]:
    """Greedy continuations from forward_dense (no cache, no engine), all prompts at once."""
    params = tiny_params() if params is None else params
    seqs = [list(p) for p in prompts]
    fn = _dense_logits_fn()
    for _ in range(max_tokens):
        batch = np.zeros((len(seqs), REF_LEN), np.int32)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        logits = np.asarray(fn(params, jnp.asarray(batch)))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def random_prompts(n: int, lengths: list[int] | None = None, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = lengths or list(rng.integers(1, 60, size=n))
    # Byte tokens only (< 256): no special token sneaks into a prompt.
    return [[int(t) for t in rng.integers(0, 256, size=int(k))] for k in lengths]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return byte_tokenizer()
