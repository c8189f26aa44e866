"""Per-request state (`Sequence`) and the public output records (`RequestOutput`)."""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any

from nanoflow_jax.engine.sampling_params import SamplingParams, is_int


@dataclasses.dataclass
class Logprob:
    """One token's log-probability under the model (vLLM's `Logprob`)."""

    logprob: float
    rank: int | None = None            # 1 = the most likely token
    decoded_token: str | None = None   # its text, when there is a tokenizer


# Per position: {token id: Logprob}, the sampled (or prompt) token first, then the top ones.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life, as vLLM's `RequestMetrics`."""

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


class Status(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and to be recomputed
    RUNNING = "running"    # holds pages
    FINISHED = "finished"


_FINISHED = Status.FINISHED   # a module constant: the enum attribute lookup is slow in hot loops


@dataclasses.dataclass
class Sequence:
    """One request as the scheduler sees it.

    Token accounting with the one-iteration-late pipeline: `output_token_ids` are tokens
    already read back from the device; `num_pending` counts tokens sampled by dispatched
    iterations but not yet read (0, 1 or, briefly, 2). `num_tokens` counts both, so the
    next position to feed is `num_tokens - 1`. `num_computed` counts tokens whose K/V has
    been written by dispatched iterations.
    """

    request_id: str
    arrival: int                  # admission order = priority (lower is older)
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                     # the request's own seed, or one drawn from the engine's
    max_tokens: int               # params.max_tokens capped by max_model_len
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_pending: int = 0
    pending_row: int = -1         # row of the latest pending token in the in-flight output
    num_computed: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    text: str = ""                # detokenized output so far (stop strings cut off)
    num_emitted: int = 0          # chars of `text` already handed out as stream deltas
    num_emitted_tokens: int = 0   # output tokens already handed out as stream deltas
    detok: Any = None             # incremental detokenizer, when there is a tokenizer
    num_preemptions: int = 0
    min_tokens_blocked: list[int] = dataclasses.field(default_factory=list)  # stop tokens held off by min_tokens
    logprobs: list[PositionLogprobs] | None = None   # per output token, when params.logprobs is set
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    # n > 1: sample `index` of a request; `group` lists all its samples (index order) and
    # `leader` is sample 0, whose prompt pages the others share (None for the leader).
    index: int = 0
    stream: bool = True           # an update every step; False: only the final one (LLM.generate)
    stream_interval: int = 1      # with stream: updates at the first token, then every N tokens
    group: list["Sequence"] | None = dataclasses.field(default=None, repr=False)
    leader: "Sequence | None" = dataclasses.field(default=None, repr=False)
    page_keys: list[bytes] = dataclasses.field(default_factory=list)   # prefix-cache keys of its full known pages
    num_cached_pages: int = 0     # leading block_table pages already offered to the prefix cache

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_known(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_known + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def in_decode(self) -> bool:
        """Everything but the last token is in the cache: the next step feeds one token."""
        return self.num_computed == self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    @property
    def will_finish_by_length(self) -> bool:
        """Its pending token is its last one for sure (max_tokens): do not schedule it again."""
        return self.num_generated >= self.max_tokens

    def streams_now(self) -> bool:
        """A streamed update is due for the token just read (the first, then every N)."""
        return self.stream and (len(self.output_token_ids) - 1) % self.stream_interval == 0

    def take_delta(self) -> str:
        """The text not yet streamed, less a tail that may still become a stop string.

        A stop string can arrive over several tokens; text that might be its start is
        held back until it cannot be (or the request ends), so the deltas handed out
        always add up to the final text, which has the stop string cut off.
        """
        end = len(self.text) if self.is_finished else len(self.text) - _stop_prefix_len(self.text, self.params.stop)
        delta = self.text[self.num_emitted:end]
        self.num_emitted = max(self.num_emitted, end)
        return delta

    def take_token_delta(self) -> list[int]:
        """Output tokens not yet handed out in an update."""
        ids = self.output_token_ids[self.num_emitted_tokens:]
        self.num_emitted_tokens = len(self.output_token_ids)
        return ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Known tokens at positions [start, end) (prompt then outputs)."""
        p = self.prompt_len
        return self.prompt_token_ids[start:end] + self.output_token_ids[max(0, start - p):max(0, end - p)]


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start (not all) of a stop string."""
    longest = 0
    for stop in stops:
        # Candidate starts are the stop's first character within its reach of the end;
        # the first one that fits is the longest for this stop.
        at = text.find(stop[0], max(0, len(text) - len(stop) + 1), len(text) - longest)
        while at != -1:
            if stop.startswith(text[at:]):
                longest = len(text) - at
                break
            at = text.find(stop[0], at + 1, len(text) - longest)
    return longest


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    delta_text: str = ""               # streaming: what this update added
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: float | None = None   # sum of the sampled tokens' logprobs (with `logprobs`)
    logprobs: list[PositionLogprobs] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


def _completion(seq: Sequence, delta_text: str, delta_token_ids: list[int] | None) -> CompletionOutput:
    # Positional and without re-copying the delta (a fresh slice already): one of these is
    # built per streamed request per iteration, on the host's critical path.
    return CompletionOutput(seq.index, seq.text[:seq.num_emitted], seq.output_token_ids[:], seq.finish_reason,
                            seq.stop_reason, delta_text, [] if delta_token_ids is None else delta_token_ids,
                            seq.cumulative_logprob, None if seq.logprobs is None else seq.logprobs[:])


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None   # set when this request was rejected or failed (the others still run)
    prompt_logprobs: list[PositionLogprobs | None] | None = None   # None for the first prompt token
    metrics: RequestMetrics | None = None

    @classmethod
    def from_sequence(cls, seq: Sequence,
                      deltas: dict[int, tuple[str, list[int]]] | None = None) -> "RequestOutput":
        """The request as streamed so far: `text` holds what the deltas handed out. For
        n > 1, one CompletionOutput per sample; `deltas` maps id(sample) to the new text and
        tokens this update hands out (a sample absent from it has none)."""
        members = seq.group or [seq]
        deltas = deltas or {}
        comps = [_completion(m, *deltas.get(id(m), ("", None))) for m in members]
        lead = members[0]
        # prompt_token_ids is the request's own list, shared by its updates (read-only).
        return cls(lead.request_id, lead.prompt, lead.prompt_token_ids, comps,
                   all(m.is_finished for m in members),
                   next((m.error for m in members if m.error), None), lead.prompt_logprobs,
                   None if lead.metrics is None else copy.copy(lead.metrics))

    @classmethod
    def rejected(cls, request_id: str, prompt: Any, error: str) -> "RequestOutput":
        prompt_text = prompt if isinstance(prompt, str) else None
        valid_ids = isinstance(prompt, (list, tuple)) and all(is_int(t) for t in prompt)
        prompt_ids = [int(t) for t in prompt] if valid_ids else []
        return cls(request_id=request_id, prompt=prompt_text, prompt_token_ids=prompt_ids,
                   outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
                   finished=True, error=error)
