"""`SamplingParams`: how one request picks its tokens and when it stops (names follow vLLM)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

INT32_MAX = 2**31 - 1
UINT32_END = 2**32
# Outside [MIN, MAX] float32 logits / temperature overflow, or the draw is uniform to
# float32 precision: such a value is a mistake, not a setting.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0        # presence / frequency penalties live in [-2, 2] (vLLM, OpenAI)
MAX_LOGIT_BIAS = 100.0   # OpenAI's range for logit_bias values


def is_int(value: Any) -> bool:
    """A real integer (numpy integer scalars included); bool is not one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bad(field: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"SamplingParams.{field}={value!r} is invalid: {rule}")


def _as_bias(value: Any) -> Mapping[int, float]:
    """logit_bias as {token id: bias}; JSON's string keys ("50256") become ints."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad("logit_bias", value, "use a dict {token_id: bias}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        tok = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if not is_int(tok) or not 0 <= tok <= INT32_MAX:
            raise _bad("logit_bias", value, f"key {key!r} is not a token id in [0, {INT32_MAX}]")
        if not _is_finite_number(bias) or abs(bias) > MAX_LOGIT_BIAS:
            raise _bad("logit_bias", value, f"the bias of token {tok} must be a number in "
                                            f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        out[int(tok)] = float(bias)
    return out


def _as_tuple(field: str, value: Any, kind: str) -> tuple:
    """None, one item or a sequence of items, as a tuple (a str or bytes is one item)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, bytearray)) or is_int(value):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise _bad(field, value, f"use a list of {kind}") from None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. top_k <= 0, top_p == 1 and min_p == 0 switch those filters
    off. `max_tokens=None` lets a request run until EOS, a stop or `max_model_len`.
    A `seed` makes the request's tokens reproducible whatever else shares its batches.
    Penalties, `logit_bias` and `min_tokens` change the logits the draw sees;
    `logprobs` / `prompt_logprobs` report the model's raw log-probabilities (before
    them and before temperature), as vLLM does by default. `n` samples share one prompt.
    Every number is checked against the range of the device type it is packed into
    (int32, uint32, float32), so a request that passes here can always be batched.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0     # subtracted once from every token already generated
    frequency_penalty: float = 0.0    # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0   # divides (>0) / multiplies (<0) logits of prompt and generated tokens
    min_tokens: int = 0               # EOS and stop_token_ids are blocked until this many tokens
    logit_bias: Mapping[int, float] | None = dataclasses.field(default=None, hash=False)
    logprobs: int | None = None       # top-k log-probabilities per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalise first so that equal settings compare equal and hash.
        set_ = object.__setattr__
        set_(self, "stop", _as_tuple("stop", self.stop, "non-empty strings"))
        set_(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, "token ids"))
        set_(self, "logit_bias", _as_bias(self.logit_bias))
        self._validate()
        # Plain Python numbers from here on (numpy scalars are accepted above).
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            set_(self, name, float(getattr(self, name)))
        for name in ("top_k", "seed", "max_tokens", "n", "min_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(self, name, int(getattr(self, name)))
        set_(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def _validate(self) -> None:
        t = self.temperature
        if not _is_finite_number(t) or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise _bad("temperature", t, f"use 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        if not _is_finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "use a number in (0, 1] (1 switches it off)")
        if not is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise _bad("top_k", self.top_k, f"use an integer in [1, {INT32_MAX}], or -1 / 0 to switch it off")
        if not _is_finite_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "use a number in [0, 1] (0 switches it off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < UINT32_END):
            raise _bad("seed", self.seed, "use an integer in [0, 2**32) or None")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX):
            raise _bad("max_tokens", self.max_tokens, f"use an integer in [1, {INT32_MAX}], or None for no limit")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", self.stop, "stop strings must be non-empty str")
        for tok in self.stop_token_ids:
            if not is_int(tok) or not 0 <= tok <= INT32_MAX:
                raise _bad("stop_token_ids", self.stop_token_ids, f"use token ids in [0, {INT32_MAX}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "use True or False")
        if not is_int(self.n) or not 1 <= self.n <= INT32_MAX:
            raise _bad("n", self.n, "use an integer >= 1 (samples per prompt)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_finite_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise _bad(name, v, f"use a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 switches it off)")
        r = self.repetition_penalty
        if not _is_finite_number(r) or not 0.0 < r <= MAX_TEMPERATURE:
            raise _bad("repetition_penalty", r, f"use a number in (0, {MAX_TEMPERATURE:g}] (1 switches it off)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "use an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"it must not exceed max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise _bad(name, v, "use None (off) or an integer >= 0 (top log-probabilities to return)")

    @property
    def uses_penalties(self) -> bool:
        """Any setting that changes the logits before the draw (penalties, bias, min_tokens)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias) or self.min_tokens > 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def coerce(cls, value: "SamplingParams | Mapping[str, Any] | None") -> "SamplingParams":
        """Accept a SamplingParams, a dict of its fields (as a server receives JSON) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown sampling parameter(s) {sorted(unknown)}; "
                                 f"known: {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise TypeError(f"sampling params must be SamplingParams or a dict, got {type(value).__name__}")
