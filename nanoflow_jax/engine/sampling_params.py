"""`SamplingParams`: how one request picks its tokens and when it stops (names follow vLLM)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. top_k <= 0, top_p == 1 and min_p == 0 switch those filters
    off. `max_tokens=None` lets a request run until EOS, a stop or `max_model_len`.
    A `seed` makes the request's tokens reproducible whatever else shares its batches.
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

    def __post_init__(self) -> None:
        # Normalise first so that equal settings compare equal and hash.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{field}={value!r} is invalid: {rule}")

        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0.0:
            raise bad("temperature", self.temperature, "use a number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "use a number in (0, 1] (1 switches it off)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", self.top_k, "use a positive integer, or -1 / 0 to switch it off")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "use a number in [0, 1] (0 switches it off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**32):
            raise bad("seed", self.seed, "use an integer in [0, 2**32) or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "use an integer >= 1, or None for no limit")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, "stop strings must be non-empty str")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise bad("stop_token_ids", self.stop_token_ids, "use non-negative token ids")

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
