"""The real server (a subprocess, the default model) driven by the official `openai` client:
completions and chat, streamed and not, n samples, logprobs, penalties and logit_bias,
32 concurrent streams, a client that disconnects mid-stream, bad bodies, and SIGTERM draining."""

from __future__ import annotations

import json
import math
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from nanoflow_jax.tokenizer import Tokenizer
from tests.serve.conftest import NUM_USABLE_PAGES, metrics, start_server, wait_for_idle

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _finished(url: str) -> float:
    return sum(v for k, v in metrics(url).items() if k.startswith("nanoflow_request_finished_total"))


def test_completion_streamed_and_not(client, server):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    # Several prompts in one request: one choice each, in order, token-id prompts too.
    ids = [[504, 3458, 282, 4649, 314]]
    many = client.completions.create(model=MODEL, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == choice.text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 5 and by_ids.usage.completion_tokens == 4


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_32_concurrent_streams_each_complete_once(client, server):
    before = _finished(server)
    m0 = metrics(server)
    prompts = [f"Count from {i} to {i + 5}:" for i in range(32)]

    def run(prompt: str) -> tuple[str, list[str | None]]:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        parts, reasons = [], []
        for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), reasons

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, prompts))
    for text, reasons in results:
        assert [r for r in reasons if r is not None] == ["length"] and reasons[-1] == "length"
    # A stream's text is what the same request gives alone.
    alone = client.completions.create(model=MODEL, prompt=prompts[7], max_tokens=6, temperature=0)
    assert results[7][0] == alone.choices[0].text
    m = wait_for_idle(server)
    assert m["nanoflow_kv_pages_free"] == NUM_USABLE_PAGES and m["nanoflow_kv_pages_used"] == 0
    assert m["nanoflow_num_requests_running"] == 0 and m["nanoflow_num_requests_waiting"] == 0
    assert _finished(server) - before == 33
    grew = {k: m[k] - m0[k] for k in ("nanoflow_time_to_first_token_seconds_count", "nanoflow_generation_tokens_total",
                                      "nanoflow_e2e_request_latency_seconds_count",
                                      "nanoflow_inter_token_latency_seconds_count")}
    assert grew == {"nanoflow_time_to_first_token_seconds_count": 33, "nanoflow_generation_tokens_total": 33 * 6,
                    "nanoflow_e2e_request_latency_seconds_count": 33,
                    "nanoflow_inter_token_latency_seconds_count": 33 * 5}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_request_aborted(server, stream):
    """Mid-stream, or while a non-streamed reply is being generated: pages freed, nothing runs."""
    before = metrics(server).get('nanoflow_request_finished_total{finished_reason="abort"}', 0.0)
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 240, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                # Keep the line iterator referenced: a dropped one closes the connection at once.
                lines = resp.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
                assert metrics(server)["nanoflow_num_requests_running"] == 1
            # leaving the blocks closes the connection mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):   # the client gives up and closes the connection
            httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    m = wait_for_idle(server)
    assert m["nanoflow_num_requests_running"] == 0 and m["nanoflow_kv_pages_free"] == NUM_USABLE_PAGES
    assert m['nanoflow_request_finished_total{finished_reason="abort"}'] == before + 1


@pytest.mark.parametrize("body, param", [
    (b'{"model": "x", "prompt": ', None),                                   # invalid JSON
    ({"model": MODEL, "prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ({"model": MODEL, "prompt": "Hi", "n": 2, "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "Hi", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "Hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {"10000000": 1}}, "logit_bias"),   # outside the vocabulary
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {"5": 150}}, "logit_bias"),
    ({"model": MODEL, "prompt": "Hi", "logprobs": 21}, "logprobs"),                    # past max_logprobs (20)
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {str(i): 1 for i in range(300)}}, "logit_bias"),  # (engine)
    ({"model": MODEL, "prompt": "Hi", "temprature": 0.5}, "temprature"),    # a typo is not ignored
    ({"model": MODEL, "prompt": [10**9]}, "prompt"),                        # outside the vocabulary (engine)
    ({"model": MODEL, "prompt": "Hi " * 300}, "prompt"),                    # longer than max_model_len (engine)
    ({"model": MODEL, "prompt": []}, "prompt"),
])
def test_bad_bodies_get_400_with_an_openai_error(server, body, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    for stream in (False, True):
        if stream and not isinstance(body, bytes):
            kw = {"json": {**body, "stream": True}}
        resp = httpx.post(server + "/v1/completions", timeout=60, **kw)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"]


def test_unknown_model_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_sigterm_drains_then_exits_0(default_gguf_path):
    with start_server("--drain-timeout", "60") as (url, proc):
        body = {"prompt": "Tell me a story.", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": True}
        got: dict[str, object] = {}
        first_chunk = threading.Event()

        def consume() -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
                reasons, data = [], []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                        first_chunk.set()
                        if line != "data: [DONE]":
                            reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])
                got.update(reasons=reasons, data=data)

        t = threading.Thread(target=consume)
        t.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        try:   # new work is refused while the stream drains (or the socket is already closed)
            late = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
            assert late.status_code == 503 and "Retry-After" in late.headers
        except httpx.TransportError:
            pass
        t.join(120)
        assert proc.wait(60) == 0
        assert got["data"][-1] == "[DONE]" and got["reasons"][-1] == "length"
        assert [r for r in got["reasons"] if r] == ["length"]


def test_n_samples_streamed_and_not(client):
    """Two prompts x n=3: six choices numbered prompt-major; usage counts each prompt once and
    every sample's tokens; a seeded chat streams the same three samples it answers whole."""
    kw = dict(model=MODEL, max_tokens=4, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    one = client.completions.create(model=MODEL, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=1)
    full = client.completions.create(prompt=["The capital of France is", "1, 2, 3,"], n=3, **kw)
    assert [c.index for c in full.choices] == list(range(6))
    assert all(c.finish_reason == "length" for c in full.choices)
    assert full.usage.prompt_tokens == one.usage.prompt_tokens and full.usage.completion_tokens == 6 * 4
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(messages=messages, n=3, **kw)
    texts = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(texts)) > 1   # the samples differ
    streamed, reasons, usage = {0: "", 1: "", 2: ""}, {}, None
    for chunk in client.chat.completions.create(messages=messages, n=3, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in reasons   # each choice ends once
                reasons[c.index] = c.finish_reason
    assert [streamed[i] for i in range(3)] == texts and reasons == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 12 and usage.model_dump() == whole.usage.model_dump()


def test_completion_logprobs_streamed_and_not(client, default_gguf_path):
    """Greedy tokens are rank 1: each one's logprob is the largest of its top_logprobs, and
    the text is the same as without logprobs."""
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    full = client.completions.create(**kw, logprobs=3).choices[0]
    lps = full.logprobs
    assert full.text == plain == "".join(lps.tokens) and len(lps.tokens) == 5
    assert lps.text_offset == [sum(map(len, lps.tokens[:i])) for i in range(5)]
    for token, lp, top in zip(lps.tokens, lps.token_logprobs, lps.top_logprobs):
        assert lp <= 0 and len(top) == 3 and top[token] == pytest.approx(max(top.values()), abs=1e-6)
        assert top[token] == pytest.approx(lp, abs=1e-6)
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
    # The same logprob computed by another path: a prefill over the prompt and the first 3 tokens.
    tok = Tokenizer.from_gguf(default_gguf_path)
    ids = tok.encode(kw["prompt"]) + [i for t in lps.tokens[:3] for i in tok.encode(t)]
    again = client.completions.create(**{**kw, "prompt": ids, "max_tokens": 1}, logprobs=3).choices[0].logprobs
    assert again.tokens[0] == lps.tokens[3]
    assert again.token_logprobs[0] == pytest.approx(lps.token_logprobs[3], abs=1e-3)
    assert again.top_logprobs[0] == pytest.approx(lps.top_logprobs[3], abs=1e-3)
    chunks = [c.choices[0] for c in client.completions.create(**kw, logprobs=3, stream=True) if c.choices]
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == lps.tokens
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lps.token_logprobs, abs=1e-5)


def test_chat_logprobs_streamed_and_not(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=4, temperature=0)
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert "".join(t.token for t in content) == full.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.top_logprobs[1].logprob <= t.logprob
    chunks = list(client.chat.completions.create(**kw, logprobs=True, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in streamed)   # top_logprobs left out: none
    assert client.chat.completions.create(**kw).choices[0].logprobs is None


def test_penalties_and_logit_bias_change_the_output(client, default_gguf_path):
    kw = dict(model=MODEL, prompt="red red red red red red red red", max_tokens=8, temperature=0)
    base = client.completions.create(**kw).choices[0]
    penalised = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=1.0).choices[0]
    assert base.text.count("red") > penalised.text.count("red")
    # Banning the greedy first token moves the first token elsewhere.
    first = client.completions.create(**{**kw, "max_tokens": 1}, logprobs=1).choices[0].logprobs.tokens[0]
    ids = Tokenizer.from_gguf(default_gguf_path).encode(first)
    assert len(ids) == 1
    banned = client.completions.create(**{**kw, "max_tokens": 1}, logprobs=1, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.tokens[0] != first
    extras = dict(repetition_penalty=1.3, min_tokens=2, include_stop_str_in_output=True, skip_special_tokens=False)
    assert client.completions.create(**kw, extra_body=extras).usage.completion_tokens == 8
