"""The app's HTTP behaviour over a scripted engine: overload (503 + Retry-After), request
timeouts (504), failures that stay with their request, draining, SSE framing."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from nanoflow_jax.serve.app import ServerConfig, create_app
from tests.serve.fakes import FakeEngine, FakeLLM


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def _app(engine: FakeEngine, **config):
    return create_app(FakeLLM(engine), ServerConfig("fake", **config))


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_overload_gets_503_with_retry_after_and_stalled_requests_time_out(engine):
    app = _app(engine, max_waiting_requests=2, request_timeout=1.0, retry_after=2)
    engine.hold.set()
    with TestClient(app) as client:
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append(
            client.post("/v1/completions", json={"prompt": "x", "stream": s}))) for s in (False, True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while app.state.serving.thread.num_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        over = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        err = _error(over, 503)
        assert over.headers["Retry-After"] == "2" and err["type"] == "service_unavailable"
        for t in threads:
            t.join(10)
        for resp in results:   # the streamed one too: its stream had not started
            assert _error(resp, 504)["code"] == "request_timeout"
        assert len(engine.aborted) == 2 and not engine.reqs
        engine.hold.clear()
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "t0t1t2"
        text = client.get("/metrics").text
        assert 'nanoflow_request_finished_total{finished_reason="timeout"} 2.0' in text
        assert 'nanoflow_request_rejected_total{reason="overloaded"} 1.0' in text


def test_a_failing_request_does_not_touch_the_others(engine):
    with TestClient(_app(engine)) as client:
        boom = client.post("/v1/completions", json={"prompt": "boom"})
        assert _error(boom, 500)["type"] == "server_error"
        refused = client.post("/v1/completions", json={"prompt": ["fine", "reject"], "max_tokens": 50})
        err = _error(refused, 400)
        assert err["param"] == "prompt" and err["message"] == "the prompt is refused"
        ok = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).json()
        assert [c["text"] for c in ok["choices"]] == ["t0t1", "t0t1"]
        assert ok["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_sse_frames_and_usage_chunk(engine):
    with TestClient(_app(engine)) as client:
        resp = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "t0"}
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        # the prompt the engine got is the chat template's rendering
        assert chunks[-1]["usage"]["prompt_tokens"] == len("<user>hi")


def test_draining_refuses_new_requests(engine):
    app = _app(engine)
    with TestClient(app) as client:
        app.state.serving.drain()
        assert client.get("/health").status_code == 503
        resp = client.post("/v1/completions", json={"prompt": "x"})
        assert _error(resp, 503)["type"] == "service_unavailable" and "Retry-After" in resp.headers


def test_unknown_routes_and_methods_use_the_openai_error_shape(engine):
    with TestClient(_app(engine)) as client:
        assert _error(client.get("/v1/nothing"), 404)["message"] == "Not Found"
        assert _error(client.get("/v1/completions"), 405)
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["fake"] and models["data"][0]["max_model_len"] == 128


def test_a_stream_past_its_timeout_ends_with_an_error_event(engine):
    with TestClient(_app(engine, request_timeout=0.5)) as client:
        resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**9, "stream": True})
        assert resp.status_code == 200   # the stream had started: the error comes in it
        events = [e for e in resp.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
        # A loaded machine may time the request out before its first token is streamed.
        assert len(engine.aborted) == 1 and engine.aborted[0].endswith("-0") and not engine.reqs
        if len(events) > 2:
            assert engine.aborted == [json.loads(events[0][6:])["id"] + "-0"]


def test_stream_interval_reaches_every_engine_request(engine):
    with TestClient(_app(engine, stream_interval=4)) as client:
        assert client.post("/v1/completions", json={"prompt": ["x", "y"], "max_tokens": 2}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "z", "max_tokens": 2, "stream": True}).status_code == 200
    assert engine.stream_intervals == [4, 4, 4]
    with pytest.raises(ValueError, match="stream_interval"):
        ServerConfig("fake", stream_interval=0)
