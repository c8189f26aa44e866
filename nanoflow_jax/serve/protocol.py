"""The OpenAI wire format: request models, their mapping to `SamplingParams`, response builders.

Requests are validated strictly (a temperature sent as a string is an error, not coerced)
and unknown fields are refused, so a typo fails loudly instead of being ignored. `n`,
`presence_penalty`, `frequency_penalty`, `logit_bias` (token-id string keys, biases in
[-100, 100]) and logprobs (a completion's `logprobs: k`, a chat's `logprobs` +
`top_logprobs`, up to the engine's `max_logprobs`) map onto `SamplingParams`, as do vLLM's
extra fields (top_k, min_p, ignore_eos, stop_token_ids, repetition_penalty, min_tokens,
include_stop_str_in_output, skip_special_tokens). Fields this engine cannot honour (echo,
suffix, best_of other than n, tools, tool_choice, response_format) are refused with a 400
that names the field, unless they carry their neutral value.

A request with several prompts and `n` samples answers choice `prompt_index * n + sample`,
as OpenAI and vLLM do; usage counts each prompt once and every sample's tokens.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from nanoflow_jax.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from nanoflow_jax.engine.sequence import CompletionOutput, Logprob, PositionLogprobs, RequestOutput

# OpenAI's finish reasons; the engine's "abort" and "error" never reach a finished response.
FINISH_REASONS = {"stop": "stop", "length": "length"}


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16   # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Messages may carry fields this server ignores (tool_calls of earlier turns, ...): the template decides.
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None   # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True   # vLLM's extension


# Field -> its neutral values: anything else asks for a feature SamplingParams lacks.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
# Request fields copied to SamplingParams as they are, when set.
_PASSED = ("temperature", "top_p", "seed", "stop", "top_k", "min_p", "ignore_eos", "stop_token_ids", "n",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
           "include_stop_str_in_output", "skip_special_tokens")


def check_supported(req: _SamplingFields) -> None:
    """Refuse (400, naming the field) any field set to a value this engine cannot honour."""
    for field, neutral in _NEUTRAL.items():
        if field in type(req).model_fields and getattr(req, field) not in neutral:
            raise APIError(400, f"{field}={getattr(req, field)!r} is not supported by this server "
                                f"(no such option): leave it out or set it to {neutral[-1]!r}", param=field,
                           code="unsupported_parameter")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != (req.n or 1):
        raise APIError(400, f"best_of={best_of} is not supported by this server (it returns every sample): leave "
                            f"it out or set it to n={req.n or 1}", param="best_of", code="unsupported_parameter")


def logit_bias(bias: dict[str, float], vocab_size: int | None) -> dict[int, float]:
    """OpenAI's {"token id": bias} as {int: float}; a bad key, an unknown token or a bias
    outside [-100, 100] is a 400 naming logit_bias."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\s*\d+\s*", key):
            raise APIError(400, f"logit_bias key {key!r} is not a token id: use token-id strings such as "
                                '{"1234": -100}', param="logit_bias")
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise APIError(400, f"logit_bias names token {token}, outside the model's vocabulary of {vocab_size} "
                                f"tokens (ids 0..{vocab_size - 1})", param="logit_bias")
        if not math.isfinite(value) or abs(value) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias of token {token} is {value!r}: use a number in "
                                f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", param="logit_bias")
        out[token] = float(value)
    return out


def _check_logprobs(value: int, field: str, max_logprobs: int | None) -> int:
    if value < 0 or (max_logprobs is not None and value > max_logprobs):
        top = "" if max_logprobs is None else f", at most {max_logprobs} (the engine's max_logprobs)"
        raise APIError(400, f"{field}={value} is out of range: use an integer >= 0{top}", param=field)
    return value


_FIELD = re.compile(r"SamplingParams\.(\w+)=")


def sampling_params(req: _SamplingFields, max_tokens: int | None, max_tokens_field: str = "max_tokens",
                    logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
    """The request's SamplingParams; a value SamplingParams refuses is a 400 naming the request's field."""
    check_supported(req)
    kw: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs}
    for name in _PASSED:
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.logit_bias:
        kw["logit_bias"] = logit_bias(req.logit_bias, vocab_size)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        m = _FIELD.search(str(e))
        field = m.group(1) if m else None
        if field == "max_tokens":
            field = max_tokens_field
        message = str(e).replace("SamplingParams.max_tokens", max_tokens_field).replace("SamplingParams.", "")
        raise APIError(400, message, param=field) from None


def completion_params(req: CompletionRequest, *, max_logprobs: int | None = None,
                      vocab_size: int | None = None) -> SamplingParams:
    """`logprobs: k` asks for the sampled token's logprob and the k most likely ones."""
    lps = None if req.logprobs is None else _check_logprobs(req.logprobs, "logprobs", max_logprobs)
    return sampling_params(req, req.max_tokens, logprobs=lps, vocab_size=vocab_size)


def chat_params(req: ChatCompletionRequest, *, max_logprobs: int | None = None,
                vocab_size: int | None = None) -> SamplingParams:
    """`logprobs: true` asks for the sampled tokens' logprobs, `top_logprobs: k` for k more each."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, f"top_logprobs={req.top_logprobs} needs logprobs: true", param="top_logprobs")
    lps = _check_logprobs(req.top_logprobs or 0, "top_logprobs", max_logprobs) if req.logprobs else None
    if req.max_completion_tokens is not None:
        return sampling_params(req, req.max_completion_tokens, "max_completion_tokens", lps, vocab_size)
    return sampling_params(req, req.max_tokens, logprobs=lps, vocab_size=vocab_size)


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts: text or token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt is empty: give a string, a list of strings or a list of token ids", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]
    return list(p)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Plain message dicts for the chat template; text parts are joined."""
    if not req.messages:
        raise APIError(400, "messages is empty: give at least one {'role': ..., 'content': ...}", param="messages")
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "".join(part.text for part in m.content)
        d.setdefault("content", "")
        out.append(d)
    return out


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_of(outputs: list[RequestOutput]) -> dict[str, int]:
    """Each prompt counted once, every sample's tokens counted."""
    return usage(sum(len(o.prompt_token_ids) for o in outputs),
                 sum(len(c.token_ids) for o in outputs for c in o.outputs))


def finish_reason(comp: CompletionOutput) -> str | None:
    reason = comp.finish_reason
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def token_text(token: int, lp: Logprob) -> str:
    """A token as the logprobs show it (vLLM's "token_id:N" when there is no tokenizer)."""
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token}"


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of one position, by rank (the sampled one may be outside them)."""
    return sorted(entry.items(), key=lambda item: item[1].rank or 0)[:k]


def completion_logprobs(token_ids: list[int], entries: list[PositionLogprobs], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape; each top_logprobs dict holds the sampled token and the top k,
    as `logprobs: k` promises (up to k + 1 entries)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = token_text(token, entry[token])
        tokens.append(text)
        token_lps.append(entry[token].logprob)
        tops.append({token_text(t, lp): lp.logprob for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_token(token: int, lp: Logprob) -> dict[str, Any]:
    text = token_text(token, lp)
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], k: int) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and the k most likely."""
    content = [{**_chat_token(token, entry[token]), "top_logprobs": [_chat_token(t, lp) for t, lp in _top(entry, k)]}
               for token, entry in zip(token_ids, entries)]
    return {"content": content, "refusal": None}


_to_json = json.JSONEncoder(ensure_ascii=False).encode


def sse_event(data: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {_to_json(data)}\n\n"


class ResponseBuilder:
    """Builds one endpoint's response bodies and stream chunks for one HTTP request.

    `n` is the samples per prompt; `logprobs` the top logprobs asked for (None: none)."""

    def __init__(self, chat: bool, request_id: str, model: str, n: int = 1, logprobs: int | None = None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.n = n
        self.logprobs = logprobs
        self.created = int(time.time())
        # Streaming, per choice index: tokens whose logprobs went out, their text length, opened, finished.
        self._sent: dict[int, int] = {}
        self._offset: dict[int, int] = {}
        self._opened: set[int] = set()
        self._done: set[int] = set()
        # A chunk's event up to its choice's index: `sse_chunk` formats the rest directly.
        head = _to_json(self._head("chat.completion.chunk" if chat else "text_completion"))
        self._event_head = f'data: {head[:-1]}, "choices": [{{"index": '

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, comp: CompletionOutput, start: int, offset: int = 0) -> dict[str, Any] | None:
        """The logprobs of comp's tokens from `start` on, in this endpoint's shape."""
        if self.logprobs is None or comp.logprobs is None:
            return None
        ids, entries = comp.token_ids[start:], comp.logprobs[start:len(comp.token_ids)]
        if self.chat:
            return chat_logprobs(ids, entries, self.logprobs)
        return completion_logprobs(ids, entries, offset)

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The non-streaming body: n choices per prompt, in order, and the usage."""
        choices = []
        for i, out in enumerate(outputs):
            for comp in out.outputs:
                choice: dict[str, Any] = {"index": i * self.n + comp.index}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": comp.text}
                else:
                    choice["text"] = comp.text
                choices.append({**choice, "logprobs": self._logprobs(comp, 0), "finish_reason": finish_reason(comp)})
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": choices, "usage": usage_of(outputs)}

    def chunk(self, index: int, text: str, reason: str | None, first: bool = False,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed piece of choice `index`; a chat stream's first piece names the role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def sse_chunk(self, index: int, text: str, reason: str | None, first: bool = False,
                  logprobs: dict[str, Any] | None = None) -> str:
        """`chunk` as one server-sent event. Without logprobs (the common case, once per
        streamed request per iteration) the JSON is formatted directly, not built as a dict."""
        if logprobs is not None:
            return sse_event(self.chunk(index, text, reason, first, logprobs))
        body, end = _to_json(text), _to_json(reason)
        if self.chat:
            delta = f'{{"role": "assistant", "content": {body}}}' if first else f'{{"content": {body}}}'
            return f'{self._event_head}{index}, "delta": {delta}, "logprobs": null, "finish_reason": {end}}}]}}\n\n'
        return f'{self._event_head}{index}, "text": {body}, "logprobs": null, "finish_reason": {end}}}]}}\n\n'

    def stream_chunks(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        """The chunks of one engine update: one per sample with new text, tokens or its end."""
        return [self.chunk(*piece) for piece in self._stream_pieces(prompt_index, out)]

    def stream_events(self, prompt_index: int, out: RequestOutput) -> str:
        """`stream_chunks` as server-sent events, in one string."""
        return "".join([self.sse_chunk(*piece) for piece in self._stream_pieces(prompt_index, out)])

    def _stream_pieces(self, prompt_index: int, out: RequestOutput) -> list[tuple[Any, ...]]:
        """`chunk`'s arguments for each sample of an update with new text, tokens or its end.

        An update carries every sample's state, but only its own sample's delta; the
        others are at most as far as their own last update, so nothing is sent twice."""
        pieces = []
        for comp in out.outputs:
            index = prompt_index * self.n + comp.index
            reason = finish_reason(comp) if index not in self._done else None
            start = self._sent.get(index, 0)
            if not (comp.delta_text or comp.delta_token_ids or reason or len(comp.token_ids) > start):
                continue
            offset = self._offset.get(index, 0)
            lps = self._logprobs(comp, start, offset)
            if lps is not None and not self.chat:
                self._offset[index] = offset + sum(map(len, lps["tokens"]))
            self._sent[index] = len(comp.token_ids)
            if reason is not None:
                self._done.add(index)
            pieces.append((index, comp.delta_text, reason, index not in self._opened, lps))
            self._opened.add(index)
        return pieces

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_of(outputs)}
