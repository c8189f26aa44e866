"""Request updates between the engine process and the server process, as deltas.

An update (`RequestOutput`) holds each sample's whole text, tokens and logprobs so far,
and the prompt's tokens: pickling those whole every iteration for every streamed request
would cost the engine process O(length) a token. The encoder sends the prompt once and,
per sample, only what grew since the request's last update; the decoder keeps the
running values and rebuilds updates equal to the engine's. This relies on what a stream
guarantees anyway: text, tokens and logprobs handed out are never taken back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nanoflow_jax.engine.sequence import CompletionOutput, RequestOutput

# One sample's delta: (index, text start, text tail, token start, new tokens, logprobs start
# or None, new logprobs, finish_reason, stop_reason, delta_text, delta_token_ids, cumulative_logprob).
Encoded = tuple[Any, ...]


def _tail(seq: Any, sent: int) -> tuple[int, Any]:
    start = min(sent, len(seq))
    return start, seq[start:]


class UpdateEncoder:
    """Engine side: RequestOutput -> compact tuples (remembers what each request was sent)."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, tuple[int, int, int]]] = {}

    def encode(self, outputs: list[RequestOutput]) -> list[Encoded]:
        return [self._one(out) for out in outputs]

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def _one(self, out: RequestOutput) -> Encoded:
        first = out.request_id not in self._sent
        sent = self._sent.setdefault(out.request_id, {})
        samples = []
        for c in out.outputs:
            text_sent, tokens_sent, logprobs_sent = sent.get(c.index, (0, 0, 0))
            text_start, text = _tail(c.text, text_sent)
            token_start, tokens = _tail(c.token_ids, tokens_sent)
            lp_start, lps = (None, None) if c.logprobs is None else _tail(c.logprobs, logprobs_sent)
            sent[c.index] = (len(c.text), len(c.token_ids), 0 if c.logprobs is None else len(c.logprobs))
            samples.append((c.index, text_start, text, token_start, tokens, lp_start, lps, c.finish_reason,
                            c.stop_reason, c.delta_text, c.delta_token_ids, c.cumulative_logprob))
        prompt = (out.prompt, out.prompt_token_ids, out.prompt_logprobs) if first else None
        if out.finished:
            del self._sent[out.request_id]
        return (out.request_id, out.finished, out.error, prompt, out.metrics, samples)


@dataclasses.dataclass
class _Request:
    prompt: Any
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    samples: dict[int, list[Any]] = dataclasses.field(default_factory=dict)   # index -> [text, tokens, logprobs]


class UpdateDecoder:
    """Server side: compact tuples -> RequestOutputs equal to the engine's."""

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def decode(self, encoded: list[Encoded]) -> list[RequestOutput]:
        return [self._one(e) for e in encoded]

    def _one(self, e: Encoded) -> RequestOutput:
        request_id, finished, error, prompt, metrics, samples = e
        req = self._requests.get(request_id)
        if prompt is not None:
            req = self._requests[request_id] = _Request(*prompt)
        elif req is None:   # an update of a request forgotten (aborted) here meanwhile: not kept
            req = _Request(None, [], None)
        comps = []
        for (index, text_start, text, token_start, tokens, lp_start, lps, finish_reason, stop_reason, delta_text,
             delta_token_ids, cumulative_logprob) in samples:
            state = req.samples.setdefault(index, ["", [], None])
            state[0] = state[0][:text_start] + text
            del state[1][token_start:]
            state[1].extend(tokens)
            if lp_start is None:
                state[2] = None
            else:
                state[2] = (state[2] or [])[:lp_start] + lps
            comps.append(CompletionOutput(index, state[0], state[1][:], finish_reason, stop_reason, delta_text,
                                          delta_token_ids, cumulative_logprob,
                                          None if state[2] is None else state[2][:]))
        if finished:
            self._requests.pop(request_id, None)
        return RequestOutput(request_id, req.prompt, req.prompt_token_ids, comps, finished, error,
                             req.prompt_logprobs, metrics)
