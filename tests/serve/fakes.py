"""A scripted stand-in for LLMEngine / LLM, so the engine thread and the app's load and fault
paths run deterministically in milliseconds."""

from __future__ import annotations

import dataclasses
import threading
import time
import types
from typing import Any

from nanoflow_jax.engine.llm_engine import RequestError
from nanoflow_jax.engine.sequence import CompletionOutput, RequestOutput


@dataclasses.dataclass
class _Req:
    prompt_ids: list[int]
    max_tokens: int
    produced: int = 0


class FakeEngine:
    """Each step gives every request one token ("t<k>"). A prompt "reject" is refused at
    add_request, "boom" fails at its first step, "crash" makes every step raise while it is
    queued; `hold` (an Event) freezes the engine."""

    def __init__(self, num_pages: int = 64) -> None:
        self.reqs: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.stream_intervals: list[int] = []   # as each add_request got it
        self.hold = threading.Event()
        self.num_pages = num_pages
        self.steps = 0

    def add_request(self, prompt: Any, params: Any, request_id: str, add_special_tokens: bool = True,
                    stream_interval: int = 1) -> str:
        self.stream_intervals.append(stream_interval)
        if prompt == "reject":
            raise RequestError(request_id, "the prompt is refused")
        ids = list(prompt) if isinstance(prompt, list) else [ord(c) for c in prompt]
        self.reqs[request_id] = _Req(ids, params.max_tokens or 4)
        return request_id

    def abort(self, request_id: str) -> None:
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.reqs)

    def stats(self) -> dict[str, int]:
        used = len(self.reqs)
        return {"num_running": used, "num_waiting": 0, "kv_pages_total": self.num_pages,
                "kv_pages_free": self.num_pages - used, "num_preemptions": 0, "num_iterations": self.steps}

    def step(self) -> list[RequestOutput]:
        if any(r.prompt_ids == [ord(c) for c in "crash"] for r in self.reqs.values()):
            raise RuntimeError("the step crashed")
        if self.hold.is_set():
            time.sleep(0.005)
            return []
        self.steps += 1
        outs = []
        for rid, r in list(self.reqs.items()):
            error = "request failed: boom" if r.prompt_ids == [ord(c) for c in "boom"] else None
            r.produced += 1
            done = error is not None or r.produced >= r.max_tokens
            reason = "error" if error else "length" if done else None
            comp = CompletionOutput(0, "".join(f"t{k}" for k in range(r.produced)), list(range(r.produced)),
                                    reason, delta_text=f"t{r.produced - 1}", delta_token_ids=[r.produced - 1])
            outs.append(RequestOutput(rid, None, r.prompt_ids, [comp], done, error))
            if done:
                del self.reqs[rid]
        return outs


class FakeLLM:
    """What the app uses of `LLM`: the engine, its config, chat rendering."""

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine or FakeEngine()
        self.engine_config = dataclasses.make_dataclass("Cfg", [("max_model_len", int)])(128)

    def _render_chat(self, messages: Any, add_generation_prompt: bool) -> list[str]:
        return ["".join(f"<{m['role']}>{m['content']}" for m in messages)]


def fake_llm(**_: Any) -> FakeLLM:
    """A FakeLLM as the engine process builds one (RemoteLLM's factory)."""
    llm = FakeLLM()
    llm.engine_config = types.SimpleNamespace(max_model_len=128)   # picklable, unlike the Cfg class
    llm.model_config = None
    llm.tokenizer = None
    return llm
