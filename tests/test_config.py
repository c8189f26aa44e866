"""ModelConfig from HF config.json dicts, GGUF metadata and the shipped configs."""

import dataclasses

import pytest

from nanoflow_jax.config import ConfigError, ModelConfig, RopeScaling, available_configs

# Parameter counts published by the model authors (billions, 2 decimals).
KNOWN_PARAMS_B = {"llama-3-8b": 8.03, "llama-3-70b": 70.55, "llama-2-70b": 68.98,
                  "qwen2-72b": 72.71, "mistral-7b": 7.25, "smollm2-135m": 0.13}


def test_shipped_configs_present_and_param_counts():
    names = available_configs()
    for name, billions in KNOWN_PARAMS_B.items():
        assert name in names
        cfg = ModelConfig.from_name(name)
        assert round(cfg.num_params() / 1e9, 2) == billions, name


def test_families():
    qwen = ModelConfig.from_name("qwen2-72b")
    assert qwen.architecture == "qwen2" and qwen.attention_bias
    smol = ModelConfig.from_name("smollm2-135m")
    assert smol.tie_word_embeddings and smol.head_dim == 64
    l31 = ModelConfig.from_name("llama-3.1-8b")
    assert l31.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_name("mistral-7b").architecture == "mistral"


def test_hf_dict_round_trip():
    for name in available_configs():
        cfg = ModelConfig.from_name(name)
        again = ModelConfig.from_hf_dict(cfg.to_hf_dict(), name=cfg.name)
        assert again == cfg


def test_config_is_hashable_for_jit():
    assert hash(ModelConfig.from_name("llama-3-8b")) == hash(ModelConfig.from_name("llama-3-8b"))


def test_unknown_architecture_is_a_clear_error():
    d = ModelConfig.from_name("llama-3-8b").to_hf_dict()
    d["architectures"], d["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict(d)


def test_bad_values_and_rope_types():
    d = ModelConfig.from_name("llama-3-8b").to_hf_dict()
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_dict({**d, "num_key_value_heads": 5})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="unknown model config"):
        ModelConfig.from_name("llama-9-1t")


def test_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 96, "llama.block_count": 3,
            "llama.vocab_size": 100, "llama.rope.freq_base": 5e4}
    cfg = ModelConfig.from_gguf_metadata(meta, has_output_tensor=False)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings, cfg.rope_theta) == (16, 2, True, 5e4)
    with pytest.raises(ConfigError, match="lacks 'llama.block_count'"):
        ModelConfig.from_gguf_metadata({k: v for k, v in meta.items() if k != "llama.block_count"}, True)
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'falcon'"):
        ModelConfig.from_gguf_metadata({**meta, "general.architecture": "falcon"}, True)


@pytest.mark.parametrize("field, value, match", [
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a finite number > 0"),
    ("rope_theta", -1e4, "rope_theta must be a finite number > 0"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number > 0"),
    ("max_position_embeddings", 0, "max_position_embeddings must be an integer > 0"),
    ("num_layers", 2.0, "num_layers must be an integer > 0"),
    ("num_heads", True, "num_heads must be an integer > 0"),
    ("eos_token_id", 49152, "eos_token_id must be None or a token id in \\[0, 49152\\)"),
    ("bos_token_id", "1", "bos_token_id must be None or a token id"),
    ("architecture", "gpt2", "architecture must be one of"),
])
def test_invalid_fields(field, value, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(ModelConfig.from_name("smollm2-135m"), **{field: value})


def test_invalid_rope_scaling():
    with pytest.raises(ConfigError, match="high_freq_factor .* must exceed low_freq_factor"):
        RopeScaling(8.0, 4.0, 4.0, 8192)
    with pytest.raises(ConfigError, match="factor must be a finite number > 0"):
        RopeScaling(0.0, 1.0, 4.0, 8192)


def test_gguf_metadata_types_and_ranges():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 96, "llama.block_count": 3, "llama.vocab_size": 100}
    for bad, match in [({"llama.block_count": "3"}, "'llama.block_count' must be an integer, got str '3'"),
                       ({"llama.block_count": [3]}, "'llama.block_count' must be an integer, got list"),
                       ({"llama.attention.head_count": 0}, "'llama.attention.head_count' must be positive"),
                       ({"llama.attention.head_count": 5}, "not a multiple of 'llama.attention.head_count'"),
                       ({"llama.rope.freq_base": "1e4"}, "'llama.rope.freq_base' must be a number"),
                       ({"llama.context_length": 0}, "max_position_embeddings must be an integer > 0"),
                       ({"general.architecture": 1}, "'general.architecture' must be a string")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_gguf_metadata({**meta, **bad}, True)
    # an explicit key length lifts the divisibility requirement; integer-typed floats are accepted
    cfg = ModelConfig.from_gguf_metadata({**meta, "llama.attention.head_count": 5, "llama.attention.key_length": 16,
                                          "llama.rope.freq_base": 10000}, True)
    assert (cfg.head_dim, cfg.rope_theta) == (16, 10000.0) and isinstance(cfg.rope_theta, float)
