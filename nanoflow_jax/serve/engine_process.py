"""The engine in its own process: the server's event loop and the engine share no GIL.

With the engine on a thread of the server process, every streamed token's HTTP work on
the event loop competes with the engine's host work for one interpreter lock, and the
device waits on both. Here a child process (spawned, so the server process never touches
the GPU) builds the `LLM` and loops: take the commands that arrived, step, send the step's
updates back as deltas (`wire.py`). In the server process `RemoteLLM` stands in for the
`LLM`: its `engine` (`RemoteEngine`) has the engine methods the `EngineThread` calls, so
admission, timeouts, metrics and delivery stay the engine thread's, unchanged.

Commands (add, abort, stop) go down one pipe and step messages come up another; a reader
thread in the child takes commands off their pipe at once, so neither side's send waits
on the other's. The child ignores SIGINT (the server drains on it and then sends stop) and exits
when the server process goes away (its pipe closes).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import multiprocessing
import signal
import threading
from typing import Any

from nanoflow_jax.serve.engine_thread import Refusal
from nanoflow_jax.serve.wire import UpdateDecoder, UpdateEncoder

_POLL_S = 0.5   # the longest a RemoteEngine.step waits, so the engine thread still expires timeouts


def runtime_info() -> dict[str, str]:
    """What runs the model: jax's version, backend and first device (initialises the backend)."""
    import jax

    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


@dataclasses.dataclass
class EngineInfo:
    """What the child reports once its LLM is ready: what the server's handlers read."""

    engine_config: Any
    model_config: Any
    tokenizer: Any
    runtime: dict[str, str]
    stats: dict[str, int]


class RemoteEngine:
    """The engine methods `EngineThread` calls, forwarded to the child (one caller thread)."""

    def __init__(self, commands: Any, updates: Any, process: Any, stats: dict[str, int]) -> None:
        self._commands = commands
        self._conn = updates
        self._process = process
        self._stats = stats
        self._open: set[str] = set()            # added, not yet finished, refused or aborted
        self._ready: list[Any] = []              # updates received by stats(), for the next step()
        self._failure: str | None = None
        self._decoder = UpdateDecoder()

    def add_request(self, prompt: Any, params: Any, request_id: str, add_special_tokens: bool = True,
                    stream_interval: int = 1) -> str:
        self._send(("add", request_id, prompt, params, add_special_tokens, stream_interval))
        self._open.add(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        self._open.discard(request_id)
        self._decoder.forget(request_id)
        self._send(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._open or self._ready or self._failure)

    def stats(self) -> dict[str, int]:
        """The child's counts as of its last message (takes any that arrived; never raises)."""
        try:
            self._receive(0.0)
        except RuntimeError:
            pass   # a dead child: step() and add_request report it
        return self._stats

    def step(self) -> list[Any]:
        """The updates of the child's steps since the last call (waits up to _POLL_S for one)."""
        if not self._ready:
            self._receive(_POLL_S)
        out, self._ready = self._ready, []
        if self._failure is not None and not out:   # updates that came before it go out first
            failure, self._failure = self._failure, None
            raise RuntimeError(failure)
        return out

    def _receive(self, timeout: float) -> None:
        try:
            if not self._conn.poll(timeout):
                if not self._process.is_alive():
                    raise RuntimeError(f"the engine process exited (code {self._process.exitcode})")
                return
            while True:
                self._take(self._conn.recv())
                if not self._conn.poll(0):
                    return
        except (EOFError, OSError) as e:
            raise RuntimeError(f"the engine process is gone ({type(e).__name__}; exit code "
                               f"{self._process.exitcode})") from None

    def _take(self, message: tuple[Any, ...]) -> None:
        _, encoded, refusals, failure, stats = message
        self._stats = stats
        # Updates of requests aborted here meanwhile are dropped unread (nobody listens).
        for out in self._decoder.decode([e for e in encoded if e[0] in self._open]):
            if out.finished:
                self._open.discard(out.request_id)
            self._ready.append(out)
        for request_id, text, bad_request in refusals:
            self._open.discard(request_id)
            self._ready.append(Refusal(request_id, text, bad_request))
        if failure is not None:
            self._failure = failure

    def _send(self, command: tuple[Any, ...]) -> None:
        try:
            self._commands.send(command)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"the engine process is gone ({type(e).__name__}: {e})") from None


class RemoteLLM:
    """Stands in for `LLM` in the server process; the model lives in a child process."""

    def __init__(self, llm_kwargs: dict[str, Any], start_timeout: float | None = None,
                 factory: str = "nanoflow_jax:LLM") -> None:
        """Spawn the engine process: it calls `factory` ("module:callable", the `LLM` class
        unless another builder is named) with llm_kwargs and reports when the result is ready."""
        ctx = multiprocessing.get_context("spawn")
        command_reader, self._commands = ctx.Pipe(duplex=False)
        self._conn, update_writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_engine_main, args=(command_reader, update_writer, factory, llm_kwargs),
                                    name="nanoflow-engine", daemon=True)
        self._process.start()
        command_reader.close()
        update_writer.close()
        if not self._conn.poll(start_timeout):
            self.close()
            raise RuntimeError(f"the engine process did not start within {start_timeout} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process died while loading (exit code {self._process.exitcode})") from None
        if kind != "ready":
            self._process.join(5)
            raise RuntimeError(payload)
        info: EngineInfo = payload
        self.engine_config = info.engine_config
        self.model_config = info.model_config
        self.tokenizer = info.tokenizer
        self.runtime = info.runtime
        self.engine = RemoteEngine(self._commands, self._conn, self._process, info.stats)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def _render_chat(self, messages: Any, add_generation_prompt: bool) -> list[str]:
        from nanoflow_jax.engine.llm import render_chat

        return render_chat(self.tokenizer, messages, add_generation_prompt)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child (after the engine thread has stopped): it exits, or is killed past timeout."""
        try:
            self._commands.send(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._commands.close()
        self._conn.close()


def _engine_main(commands: Any, conn: Any, factory: str, llm_kwargs: dict[str, Any]) -> None:
    """The child: build the LLM, report ready (or the error), then serve commands until stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        module, _, name = factory.partition(":")
        llm = getattr(importlib.import_module(module), name)(**llm_kwargs)
        info = EngineInfo(llm.engine_config, llm.model_config, llm.tokenizer, runtime_info(), llm.engine.stats())
    except BaseException as e:   # a bad model path or flag: the server reports it and exits
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", info))
    _EngineLoop(commands, conn, llm.engine).run()


class _EngineLoop:
    def __init__(self, commands: Any, conn: Any, engine: Any) -> None:
        self.commands = commands
        self.conn = conn
        self.engine = engine
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wake = threading.Event()
        self.encoder = UpdateEncoder()

    def _read(self) -> None:
        while True:
            try:
                command = self.commands.recv()
            except (EOFError, OSError):
                command = ("stop",)   # the server process is gone
            self.inbox.append(command)
            self.wake.set()
            if command[0] == "stop":
                return

    def run(self) -> None:
        from nanoflow_jax.engine.llm_engine import RequestError

        threading.Thread(target=self._read, name="nanoflow-engine-commands", daemon=True).start()
        engine = self.engine
        while True:
            if not engine.has_unfinished():
                self.wake.wait()
            self.wake.clear()
            commands = []
            while self.inbox:
                commands.append(self.inbox.popleft())
            refusals = []
            for command in commands:
                if command[0] == "stop":
                    return
                if command[0] == "abort":
                    engine.abort(command[1])
                    self.encoder.forget(command[1])
                    continue
                _, request_id, prompt, params, add_special_tokens, stream_interval = command
                try:
                    engine.add_request(prompt, params, request_id=request_id, add_special_tokens=add_special_tokens,
                                       stream_interval=stream_interval)
                except RequestError as e:
                    refusals.append((request_id, str(e), True))
                except Exception as e:
                    refusals.append((request_id, f"{type(e).__name__}: {e}", False))
            outputs, failure = [], None
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:   # the server fails the requests it holds and aborts them here
                    failure = f"{type(e).__name__}: {e}"
            if commands or outputs or failure:
                try:
                    self.conn.send(("step", self.encoder.encode(outputs), refusals, failure, engine.stats()))
                except OSError:
                    return   # the server process is gone
