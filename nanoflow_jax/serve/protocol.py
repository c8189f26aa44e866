"""The OpenAI wire format: request models, their mapping to `SamplingParams`, response builders.

Requests are validated strictly (a temperature sent as a string is an error, not coerced)
and unknown fields are refused, so a typo fails loudly instead of being ignored. OpenAI
fields this engine cannot honour (n > 1, penalties, logprobs, tools, ...) are refused with
a 400 that names the field, unless they carry their neutral value. vLLM's extra sampling
fields (top_k, min_p, ignore_eos, stop_token_ids) are accepted too.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import RequestOutput

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
    "n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
    "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def check_supported(req: _SamplingFields) -> None:
    """Refuse (400, naming the field) any field set to a value this engine cannot honour."""
    for field, neutral in _NEUTRAL.items():
        if field in type(req).model_fields and getattr(req, field) not in neutral:
            raise APIError(400, f"{field}={getattr(req, field)!r} is not supported by this server (its sampler has "
                                f"no such option): leave it out or set it to {neutral[-1]!r}", param=field,
                           code="unsupported_parameter")


_FIELD = re.compile(r"SamplingParams\.(\w+)=")


def sampling_params(req: _SamplingFields, max_tokens: int | None, max_tokens_field: str = "max_tokens") -> SamplingParams:
    """The request's SamplingParams; a value SamplingParams refuses is a 400 naming the request's field."""
    check_supported(req)
    kw: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "seed", "stop", "top_k", "min_p", "ignore_eos", "stop_token_ids"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        m = _FIELD.search(str(e))
        field = m.group(1) if m else None
        if field == "max_tokens":
            field = max_tokens_field
        message = str(e).replace("SamplingParams.max_tokens", max_tokens_field).replace("SamplingParams.", "")
        raise APIError(400, message, param=field) from None


def completion_params(req: CompletionRequest) -> SamplingParams:
    return sampling_params(req, req.max_tokens)


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.max_completion_tokens is not None:
        return sampling_params(req, req.max_completion_tokens, "max_completion_tokens")
    return sampling_params(req, req.max_tokens)


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
    return usage(sum(len(o.prompt_token_ids) for o in outputs),
                 sum(len(o.outputs[0].token_ids) for o in outputs))


def finish_reason(out: RequestOutput) -> str | None:
    reason = out.outputs[0].finish_reason
    return None if reason is None else FINISH_REASONS.get(reason, reason)


class ResponseBuilder:
    """Builds one endpoint's response bodies and stream chunks for one HTTP request."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The non-streaming body: one choice per prompt, in order, and the usage."""
        choices = []
        for i, out in enumerate(outputs):
            text = out.outputs[0].text
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish_reason(out)})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(out)})
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": choices, "usage": usage_of(outputs)}

    def chunk(self, index: int, text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
        """One streamed piece of choice `index`; a chat stream's first piece names the role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_of(outputs)}
