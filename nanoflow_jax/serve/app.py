"""The FastAPI app: OpenAI's /v1/completions and /v1/chat/completions, /v1/models, /health, /metrics.

Handlers validate a request, turn it into engine requests (`RequestGroup`) and await their
updates; the engine runs on its own thread (`engine_thread.py`). A streaming response
starts once the first update arrives, so a request the engine refuses still gets a plain
HTTP error; after that, an error ends the stream with an `error` event and `[DONE]`.
A client that disconnects, before or during its response, has its requests aborted.
Every error body has OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow_jax.serve import protocol
from nanoflow_jax.serve.engine_process import runtime_info
from nanoflow_jax.serve.engine_thread import EngineThread, RequestGroup, unavailable
from nanoflow_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from nanoflow_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    model_aliases: tuple[str, ...] = ()          # other names a request's `model` may use (the --model path)
    max_waiting_requests: int | None = 4096     # accepted requests without a token yet; past it, 503
    request_timeout: float | None = 600.0       # seconds from arrival; past it the request is aborted (504)
    retry_after: int = 1                        # seconds, in the 503's Retry-After header
    stream_interval: int = 1                    # a stream's updates: its first token, then every N tokens

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")


class Serving:
    """What the handlers share: the LLM (tokenizer, chat template), the engine thread, the metrics.

    `llm` is an `LLM`, or a `RemoteLLM` whose model runs in an engine process."""

    def __init__(self, llm: Any, config: ServerConfig) -> None:
        self.llm = llm
        self.config = config
        self.metrics = ServerMetrics()
        self.thread = EngineThread(llm.engine, self.metrics, max_waiting=config.max_waiting_requests,
                                   retry_after=config.retry_after, stream_interval=config.stream_interval)
        self.draining = False
        self.created = int(time.time())
        self.runtime = getattr(llm, "runtime", None) or runtime_info()
        # What request validation checks against: the logprobs cap and the vocabulary (logit_bias).
        model_config = getattr(llm, "model_config", None)
        self.limits = {"max_logprobs": getattr(llm.engine_config, "max_logprobs", None),
                       "vocab_size": getattr(model_config, "vocab_size", None)}

    def engine_down(self) -> str | None:
        """Why no request can be served (the engine thread or process has died), or None."""
        if not self.thread.is_alive():
            return "engine thread down"
        if not getattr(self.llm, "is_alive", lambda: True)():
            return "engine process down"
        return None

    def drain(self) -> None:
        """Stop taking requests (503); those accepted carry on."""
        self.draining = True
        self.thread.close()

    def check_open(self) -> None:
        if self.draining:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise unavailable("the server is shutting down: retry on another replica", self.config.retry_after,
                              "shutting_down")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name and model not in self.config.model_aliases:
            raise APIError(404, f"the model {model!r} does not exist: this server serves "
                                f"{self.config.served_model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def start_group(self, prefix: str, prompts: list[str | list[int]], params: Any,
                    add_special_tokens: bool) -> RequestGroup:
        try:
            return RequestGroup(self.thread, f"{prefix}-{uuid.uuid4().hex}", prompts, params,
                                add_special_tokens=add_special_tokens, timeout=self.config.request_timeout)
        except APIError as e:
            self.metrics.rejected.labels(reason=e.code or "unavailable").inc()
            raise


def create_app(llm: Any, config: ServerConfig) -> FastAPI:
    """An app over `llm` (an `LLM`); its engine thread starts and stops with the app's lifespan.

    From start-up to shutdown the app's thread alone drives `llm.engine`: calling
    `llm.generate` or `llm.stream` meanwhile would take the server's updates."""
    serving = Serving(llm, config)
    kv_pages = llm.engine.stats()["kv_pages_total"]   # read before the engine thread owns the engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving.thread.start(asyncio.get_running_loop())
        yield
        serving.drain()
        await asyncio.to_thread(serving.thread.stop, 60.0)   # a step stuck on the device: exit anyway
        close = getattr(llm, "close", None)
        if close is not None:
            await asyncio.to_thread(close)   # the engine process, when there is one

    app = FastAPI(title="nanoflow_jax", lifespan=lifespan)
    app.state.serving = serving
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        down = "draining" if serving.draining else serving.engine_down()
        if down:
            return JSONResponse({"status": down}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        """What runs the model (benchmarks record it: their client must not touch the GPU)."""
        return {**serving.runtime, "model": config.served_model_name,
                "engine_config": dataclasses.asdict(llm.engine_config),
                "kv_pages": kv_pages}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": config.served_model_name, "object": "model", "created": serving.created,
                "owned_by": "nanoflow_jax", "max_model_len": llm.engine_config.max_model_len}
        return {"object": "list", "data": [card]}

    async def generate(prefix: str, prompts: list[str | list[int]], params: Any, body: Any, request: Request,
                       chat: bool) -> Response:
        """Hand the prompts to the engine thread and answer with their outputs (a chat's
        text is templated already, so no special tokens are added to it)."""
        group = serving.start_group(prefix, prompts, params, add_special_tokens=not chat)
        builder = protocol.ResponseBuilder(chat, group.base_id, body.model or config.served_model_name,
                                           params.n, params.logprobs)
        return await _respond(group, builder, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        serving.check_open()
        serving.check_model(body.model)
        params = protocol.completion_params(body, **serving.limits)
        prompts = protocol.completion_prompts(body)
        return await generate("cmpl", prompts, params, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        serving.check_open()
        serving.check_model(body.model)
        params = protocol.chat_params(body, **serving.limits)
        messages = protocol.chat_messages(body)
        try:
            text = llm._render_chat(messages, body.add_generation_prompt)[0]
        except ValueError as e:   # ChatTemplateError included, and a model without a tokenizer
            raise APIError(400, str(e), param="messages") from None
        return await generate("chatcmpl", [text], params, body, request, chat=True)

    return app


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Any, group: RequestGroup) -> Any:
    """Await `work`; if the client goes first, abort the group (the result is nobody's)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            group.close()


async def _respond(group: RequestGroup, builder: protocol.ResponseBuilder,
                   body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    try:
        if not body.stream:
            outputs = await _unless_disconnected(request, group.collect(), group)
            if outputs is None:
                return Response(status_code=499)   # nobody reads it
            return JSONResponse(builder.response(outputs))
        first = await _unless_disconnected(request, group.next(), group)
        if first is None:
            return Response(status_code=499)
    except BaseException:
        group.close()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(group, builder, first, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(group: RequestGroup, builder: protocol.ResponseBuilder, first: Any,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per sample with new tokens, the usage if asked, then [DONE].

    A sample's tokens that add no text yet (half a UTF-8 character, a possible stop string,
    or a model without a tokenizer) still sends a chunk, so clients see every token arrive."""
    try:
        updates = [first]
        while True:
            # Updates that queued up while the client was being written to go in one write.
            updates += group.ready()
            events = "".join([builder.stream_events(group.index[out.request_id], out) for out in updates])
            if events:
                yield events
            if not group.pending:
                break
            updates = [await group.next()]
        if include_usage:
            yield protocol.sse_event(builder.usage_chunk([group.final[i] for i in range(len(group.ids))]))
    except APIError as e:
        yield protocol.sse_event(e.body())
    finally:
        group.close()   # a client gone mid-stream lands here (cancelled): its requests are aborted
    yield "data: [DONE]\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return api_error_response(_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return api_error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return api_error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


def api_error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_error(errors: Any) -> APIError:
    """pydantic's first complaint as a 400 naming the field (or the JSON problem)."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    field = loc[0] if loc else None
    where = ".".join(loc) or "body"
    extra = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {err.get('msg')}; got {err.get('input')!r}{extra}", param=field)
