"""`ModelConfig`: the static description of a Llama-family model.

Built from a Hugging Face `config.json`, from GGUF metadata, or from a named JSON in
`configs/models/`. It is frozen and hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Mapping

# Architectures that share the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

# The forward's kernel sets (models/ops.py): auto = pallas on a GPU, xla elsewhere;
# hybrid = Pallas kernels except the projections, which use XLA's dot (cuBLAS).
KERNEL_SETS = ("auto", "xla", "pallas", "hybrid")
# How one iteration runs: whole batch (sequential), two nano-batches back to back (nanobatch),
# or two nano-batches overlapped on two GPU streams (nanoflow).
PIPELINES = ("sequential", "nanobatch", "nanoflow")
# What EngineConfig.pipeline takes: a mode, or auto (the searched mode for this model and GPU:
# nanoflow_jax.autosearch; sequential where none was searched or there is no GPU).
PIPELINE_CHOICES = ("auto", *PIPELINES)
# EngineConfig.kv_cache_dtype (vLLM's names): auto is the weights' dtype; fp8 is float8 e4m3.
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8", "fp8_e4m3")


class ConfigError(ValueError):
    """A model configuration that nanoflow_jax cannot serve."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        _check_positive(self, ("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",))
        if self.high_freq_factor <= self.low_freq_factor:  # the llama3 ramp divides by their difference
            raise ConfigError(f"rope_scaling high_freq_factor ({self.high_freq_factor}) must exceed "
                              f"low_freq_factor ({self.low_freq_factor})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in GGUF_ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {list(GGUF_ARCHITECTURES)}, got {self.architecture!r}")
        _check_positive(self, ("rope_theta", "rms_norm_eps"),
                        ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                         "head_dim", "max_position_embeddings"))
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{field} must be None or a token id in [0, {self.vocab_size}), got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        e, f, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = e * (self.q_size + 2 * self.kv_size) + self.q_size * e
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * e * f + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + layers * per_layer + e + head

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face style config.json dict (round-trips through from_hf_dict)."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]
        d: dict[str, Any] = {
            "architectures": [arch], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return d

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str = "") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = d.get("model_type")
            if model_type in GGUF_ARCHITECTURES:
                arch = model_type
            else:
                raise ConfigError(
                    f"unsupported architecture {archs or model_type!r}: nanoflow_jax serves "
                    f"{sorted(SUPPORTED_ARCHITECTURES)}")
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=_parse_rope_scaling(d.get("rope_scaling")),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has QKV bias; Llama may declare it with attention_bias.
            attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            name=name or d.get("_name_or_path", ""),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), name=path.stem if path.name != "config.json" else path.parent.name)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A shipped config from configs/models/ (e.g. "llama-3-8b")."""
        path = CONFIGS_DIR / f"{name}.json"
        if not path.exists():
            raise ConfigError(f"unknown model config {name!r}; shipped: {', '.join(available_configs())}")
        return cls.from_json(path)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_tensor: bool) -> "ModelConfig":
        """From GGUF key/values (already decoded to Python values)."""
        from nanoflow_jax.weights.gguf_file import meta_value

        def typed(k: str, kind: type, default: Any = None) -> Any:
            return meta_value(meta, k, kind, default, error=ConfigError)

        arch = typed("general.architecture", str)
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"unsupported GGUF architecture {arch!r}; supported: {list(GGUF_ARCHITECTURES)}")

        def key(k: str, kind: type = int, default: Any = None) -> Any:
            value = typed(f"{arch}.{k}", kind, default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks '{arch}.{k}': the file is incomplete or not a {arch} model")
            return value

        hidden, num_heads = key("embedding_length"), key("attention.head_count")
        if num_heads <= 0:  # checked here because the head size below divides by it
            raise ConfigError(f"GGUF metadata '{arch}.attention.head_count' must be positive, got {num_heads}")
        if f"{arch}.attention.key_length" not in meta and hidden % num_heads:
            raise ConfigError(f"GGUF metadata '{arch}.embedding_length' ({hidden}) is not a multiple of "
                              f"'{arch}.attention.head_count' ({num_heads}) and there is no attention.key_length")
        vocab = typed(f"{arch}.vocab_size", int) or len(typed("tokenizer.ggml.tokens", list, ()))
        if not vocab:
            raise ConfigError("GGUF metadata has neither a vocab size nor a token list")
        fields = dict(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=num_heads,
            num_kv_heads=key("attention.head_count_kv", int, num_heads),
            head_dim=key("attention.key_length", int, hidden // num_heads),
            rope_theta=key("rope.freq_base", float, 10000.0),
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-5),
            max_position_embeddings=key("context_length", int, 4096),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            bos_token_id=typed("tokenizer.ggml.bos_token_id", int),
            eos_token_id=typed("tokenizer.ggml.eos_token_id", int),
            name=typed("general.name", str, ""),
        )
        try:
            return cls(**fields)
        except ConfigError as e:  # say where the bad value came from
            raise ConfigError(f"the GGUF metadata describes an invalid model: {e}") from e


def _parse_rope_scaling(rs: Mapping[str, Any] | None) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: 'llama3'")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(obj: Any, reals: tuple[str, ...], ints: tuple[str, ...]) -> None:
    """Each `reals` field a finite number > 0 (NaN fails every comparison, so it is named here);
    each `ints` field an integer > 0."""
    for field in reals:
        value = getattr(obj, field)
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0):
            raise ConfigError(f"{field} must be a finite number > 0, got {value!r}")
    for field in ints:
        value = getattr(obj, field)
        if not (_is_int(value) and value > 0):
            raise ConfigError(f"{field} must be an integer > 0, got {value!r}")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
