"""The engine thread: one host thread owns the `LLMEngine` and loops `step()`.

HTTP handlers run on the asyncio event loop and never touch the engine. They hand
requests and aborts to the thread through a locked inbox (`submit`, `abort`); the thread
takes the whole inbox between steps, steps while work remains, and sends each step's
updates back to the loop in one `loop.call_soon_threadsafe`, which puts every update on
its request's `asyncio.Queue`. So the loop never waits on the device and the engine
never waits on a client: a slow or vanished client only leaves updates in its queue.

Admission is bounded: a request counts as waiting from `submit` until its first token
(or its end); past `max_waiting` a submission is refused with 503 and Retry-After.
A request past its timeout is aborted by the thread (pages freed) and its handler gets a
504. A request the engine refuses (prompt too long, token id out of the vocabulary) gets
a 400 and one the engine fails a 500; neither touches the others.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
import threading
import time
from typing import Any, Iterable

from nanoflow_jax.engine.llm_engine import RequestError
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import RequestOutput
from nanoflow_jax.serve.metrics import RequestTiming, ServerMetrics
from nanoflow_jax.serve.protocol import APIError

log = logging.getLogger(__name__)

_REQUEST_PREFIX = re.compile(r"^request '[^']*': ")
# A refusal about one of these settings names it; any other is about the prompt.
_REFUSED_FIELD = re.compile(r"^(logit_bias|logprobs|prompt_logprobs)\b")
Event = RequestOutput | APIError


@dataclasses.dataclass
class Refusal:
    """A request the engine would not queue: RequestError's message (bad_request) or another failure's."""

    request_id: str
    message: str
    bad_request: bool


def unavailable(message: str, retry_after: int, code: str = "overloaded") -> APIError:
    return APIError(503, message, type="service_unavailable", code=code, headers={"Retry-After": str(retry_after)})


@dataclasses.dataclass
class Submission:
    """One engine request: its prompt, its settings, and where its updates go."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    sink: asyncio.Queue[Event]
    add_special_tokens: bool = True
    timeout: float | None = None
    timing: RequestTiming = dataclasses.field(default_factory=lambda: RequestTiming(time.monotonic()))
    started: bool = False   # (engine thread) produced a token or ended: no longer counts as waiting

    @property
    def deadline(self) -> float:
        return float("inf") if self.timeout is None else self.timing.arrival + self.timeout


class EngineThread:
    """Owns one engine; `submit` / `abort` / `stop` are called from the event loop's thread."""

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None, *, max_waiting: int | None = None,
                 retry_after: int = 1, idle_wait: float = 0.5, stream_interval: int = 1) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.idle_wait = idle_wait
        self.stream_interval = stream_interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._unstarted = 0          # submitted, no token yet (guarded by _lock)
        self._closed = False         # no more submissions
        self._stopping = False
        self._live: dict[str, Submission] = {}   # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    # ---- the event loop's side ------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="nanoflow-engine", daemon=True)
        self._thread.start()
        self._publish()

    @property
    def num_waiting(self) -> int:
        """Requests accepted that have not produced a token yet (what max_waiting bounds)."""
        return self._unstarted

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, subs: list[Submission]) -> None:
        """Hand requests over, all or none; raises the 503 APIError when full or closed."""
        with self._lock:
            if self._closed:
                raise unavailable("the server is shutting down: retry on another replica", self.retry_after,
                                  "shutting_down")
            if self.max_waiting is not None and self._unstarted + len(subs) > self.max_waiting:
                raise unavailable(f"the server is overloaded: {self._unstarted} requests wait for the engine "
                                  f"(--max-waiting-requests {self.max_waiting}); retry after "
                                  f"{self.retry_after} s", self.retry_after)
            self._unstarted += len(subs)
            self._inbox.extend(("add", s) for s in subs)
        self._wake.set()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Abort requests (unknown or finished ones are ignored); their pages are freed."""
        with self._lock:
            self._inbox.extend(("abort", rid) for rid in request_ids)
        self._wake.set()

    def close(self) -> None:
        """Refuse new submissions (draining); the ones accepted carry on."""
        with self._lock:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Close, fail what is still running with 503, and end the thread (blocks: not on the loop)."""
        with self._lock:
            self._closed = True
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as e:   # a bug in this loop: fail everyone rather than hang them
            log.exception("the engine thread crashed")
            self.crashed = e
            events: list[tuple[Submission, Event]] = []
            self._fail_all(APIError(500, f"the engine thread crashed: {type(e).__name__}: {e}", "server_error"),
                           events)
            self._deliver(events)

    def _iterate(self) -> bool:
        """One pass: take the inbox, expire timeouts, step once (or wait for work)."""
        self._wake.clear()
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
            stopping = self._stopping
        events: list[tuple[Submission, Event]] = []
        for kind, item in commands:
            if kind == "add":
                self._add(item, events)
            else:
                self._abort(item)
        self._expire(time.monotonic(), events)
        if stopping:
            self._fail_all(unavailable("the server shut down before this request finished", self.retry_after,
                                       "shutting_down"), events)
            self._publish()
            self._deliver(events)
            return False
        stepped = self.engine.has_unfinished()
        if stepped:
            self._step(events)
        self._publish()   # before the updates go out: a client that saw its token sees the gauges too
        self._deliver(events)
        if not stepped:
            self._wake.wait(self._idle_timeout())
        return True

    def _idle_timeout(self) -> float:
        if not self._live:
            return self.idle_wait
        return max(0.0, min(self.idle_wait, min(s.deadline for s in self._live.values()) - time.monotonic()))

    def _add(self, sub: Submission, events: list[tuple[Submission, Event]]) -> None:
        try:
            self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id,
                                    add_special_tokens=sub.add_special_tokens, stream_interval=self.stream_interval)
        except RequestError as e:
            self._refuse(sub, Refusal(sub.request_id, str(e), bad_request=True), events)
            return
        except Exception as e:
            log.exception("adding request %s failed", sub.request_id)
            self._refuse(sub, Refusal(sub.request_id, f"{type(e).__name__}: {e}", bad_request=False), events)
            return
        self._live[sub.request_id] = sub

    def _refuse(self, sub: Submission, refusal: Refusal, events: list[tuple[Submission, Event]]) -> None:
        """A request the engine would not queue: 400 naming the field at fault, or 500."""
        self._end(sub, "error")
        if not refusal.bad_request:
            events.append((sub, APIError(500, f"the engine could not queue the request: {refusal.message}",
                                         "server_error")))
            return
        message = _REQUEST_PREFIX.sub("", refusal.message)
        field = _REFUSED_FIELD.match(message)
        events.append((sub, APIError(400, message, param=field.group(1) if field else "prompt")))

    def _abort(self, request_id: str) -> None:
        sub = self._live.pop(request_id, None)
        if sub is not None:
            self.engine.abort(request_id)
            self._end(sub, "abort")

    def _expire(self, now: float, events: list[tuple[Submission, Event]]) -> None:
        for sub in [s for s in self._live.values() if s.deadline <= now]:
            del self._live[sub.request_id]
            self.engine.abort(sub.request_id)
            self._end(sub, "timeout")
            events.append((sub, APIError(504, f"the request timed out after {sub.timeout:g} s "
                                              "(--request-timeout); it was aborted", "timeout_error",
                                         code="request_timeout")))

    def _step(self, events: list[tuple[Submission, Event]]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # The engine contains per-request failures itself; a raise is an engine bug.
            # Fail the requests it holds and keep serving new ones.
            log.exception("engine step failed")
            self._fail_all(APIError(500, f"engine step failed: {type(e).__name__}: {e}", "server_error"), events)
            time.sleep(0.01)   # a step that keeps raising must not spin a core
            return
        now = time.monotonic()
        generated = 0
        for out in outputs:
            sub = self._live.get(out.request_id)
            if sub is None:
                continue   # aborted meanwhile: its handler no longer listens
            if isinstance(out, Refusal):   # an engine in another process refuses after add_request
                del self._live[sub.request_id]
                self._refuse(sub, out, events)
                continue
            new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)   # n > 1: the sample that stepped
            generated += new_tokens
            if self.metrics is not None:
                self.metrics.observe(sub.timing, len(out.prompt_token_ids), new_tokens, now)
            if new_tokens:
                self._mark_started(sub)
            if not out.finished:
                events.append((sub, out))
                continue
            del self._live[sub.request_id]
            if out.error:
                self._end(sub, "error")
                events.append((sub, APIError(500, _REQUEST_PREFIX.sub("", out.error), "server_error")))
            else:
                self._end(sub, out.outputs[0].finish_reason or "stop", now)
                events.append((sub, out))
        if self.metrics is not None:
            self.metrics.count_generated(generated)

    def _fail_all(self, error: APIError, events: list[tuple[Submission, Event]]) -> None:
        for rid, sub in list(self._live.items()):
            del self._live[rid]
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("aborting %s failed", rid)
            self._end(sub, "error")
            events.append((sub, error))

    def _mark_started(self, sub: Submission) -> None:
        if not sub.started:
            sub.started = True
            with self._lock:
                self._unstarted -= 1

    def _end(self, sub: Submission, reason: str, now: float | None = None) -> None:
        self._mark_started(sub)
        if self.metrics is not None:
            self.metrics.end(sub.timing, reason, time.monotonic() if now is None else now)

    def _deliver(self, events: list[tuple[Submission, Event]]) -> None:
        """Put each event on its request's queue, on the loop's thread, in one hop."""
        if not events or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, [(sub.sink, ev) for sub, ev in events])
        except RuntimeError:
            pass   # the loop has closed: nobody listens any more

    def _publish(self) -> None:
        if self.metrics is not None:
            with self._lock:
                queued = sum(kind == "add" for kind, _ in self._inbox)
            self.metrics.publish(self.engine.stats(), queued)


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class RequestGroup:
    """The engine requests of one HTTP request (one per prompt), seen from the event loop."""

    def __init__(self, thread: EngineThread, base_id: str, prompts: list[str | list[int]], params: SamplingParams,
                 *, add_special_tokens: bool = True, timeout: float | None = None) -> None:
        self.thread = thread
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        arrival = time.monotonic()
        self.base_id = base_id   # the HTTP response's id
        self.ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        subs = [Submission(rid, p, params, self.queue, add_special_tokens, timeout, RequestTiming(arrival))
                for rid, p in zip(self.ids, prompts)]
        thread.submit(subs)
        self.pending = set(self.ids)
        self.final: dict[int, RequestOutput] = {}

    async def next(self) -> RequestOutput:
        """The next update of any of the group's requests; an APIError aborts the rest and raises."""
        return self._take(await self.queue.get())

    def ready(self) -> list[RequestOutput]:
        """The updates already queued, without waiting (a stream sends them in one write)."""
        out = []
        while self.pending and not self.queue.empty():
            out.append(self._take(self.queue.get_nowait()))
        return out

    def _take(self, event: Event) -> RequestOutput:
        if isinstance(event, APIError):
            self.close()
            raise event
        if event.finished:
            self.pending.discard(event.request_id)
            self.final[self.index[event.request_id]] = event
        return event

    async def collect(self) -> list[RequestOutput]:
        """Every request's final output, in prompt order."""
        while self.pending:
            await self.next()
        return [self.final[i] for i in range(len(self.ids))]

    def close(self) -> None:
        """Abort whatever has not finished (a client gone, a sibling failed); safe to repeat."""
        if self.pending:
            self.thread.abort(sorted(self.pending))
            self.pending.clear()
