"""Parity with transformers' LlamaForCausalLM on the default GGUF (fixture: tests/reference/make_hf_reference.py)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.weights.loader import load_model
from tests.models.greedy import greedy

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def smollm2(default_gguf_path):
    return load_model(default_gguf_path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURES / "smollm2_hf_reference.npz")
    meta = json.loads((FIXTURES / "smollm2_hf_reference.json").read_text())
    return data, meta


def test_prompt_tokens_match_transformers(smollm2, reference):
    data, meta = reference
    text = smollm2.tokenizer.apply_chat_template(meta["messages"], add_generation_prompt=True)
    assert text == meta["prompt_text"]
    assert smollm2.tokenizer.encode(text) == data["input_ids"].tolist()


def test_logits_match_transformers(smollm2, reference):
    data, _ = reference
    logits = np.asarray(forward_dense(smollm2.params, jnp.asarray(data["input_ids"][None]), smollm2.config)[0])
    ref = data["logits"]
    assert logits.shape == ref.shape
    err = np.abs(logits - ref).max()
    assert err < 1e-3, f"max |logits - transformers| = {err}"


def test_greedy_tokens_match_transformers(smollm2, reference):
    data, meta = reference
    key = "greedy_ids_20" if "greedy_ids_20" in data else "greedy_ids"
    ref = data[key].tolist()
    eos = None if key == "greedy_ids_20" else smollm2.config.eos_token_id
    got = greedy(smollm2.params, smollm2.config, data["input_ids"].tolist(), len(ref), eos_id=eos)
    assert got == ref


def test_known_answer_paris(smollm2):
    tok = smollm2.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = greedy(smollm2.params, smollm2.config, tok.encode(text), 20, eos_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out)
