"""OpenAI request fields mapped to SamplingParams, refused fields, prompt shapes, responses."""

from __future__ import annotations

import json
import random

import pydantic
import pytest

from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import CompletionOutput, Logprob, RequestOutput
from nanoflow_jax.serve import protocol
from nanoflow_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


def test_completion_fields_map_to_sampling_params():
    req = CompletionRequest(prompt="x", temperature=0, top_p=0.5, seed=7, stop=["\n", "END"], max_tokens=9,
                            top_k=3, min_p=0.1, ignore_eos=True, stop_token_ids=[2])
    assert protocol.completion_params(req) == SamplingParams(temperature=0.0, top_p=0.5, seed=7, stop=("\n", "END"),
                                                             max_tokens=9, top_k=3, min_p=0.1, ignore_eos=True,
                                                             stop_token_ids=(2,))
    # OpenAI's defaults: 16 tokens for a completion, temperature 1, no limit for chat
    assert protocol.completion_params(CompletionRequest(prompt="x")) == SamplingParams(max_tokens=16)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stop="!")
    assert protocol.chat_params(chat) == SamplingParams(max_tokens=None, stop="!")


def test_chat_max_completion_tokens_wins_and_errors_name_it():
    msgs = [{"role": "user", "content": "hi"}]
    req = ChatCompletionRequest(messages=msgs, max_tokens=5, max_completion_tokens=7)
    assert protocol.chat_params(req).max_tokens == 7
    with pytest.raises(APIError) as e:
        protocol.chat_params(ChatCompletionRequest(messages=msgs, max_completion_tokens=0))
    assert e.value.status == 400 and e.value.param == "max_completion_tokens"
    assert e.value.message.startswith("max_completion_tokens=0 is invalid")


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("seed", -3), ("top_k", -5),
                                          ("stop", [""])])
def test_values_sampling_params_refuses_are_400_naming_the_field(field, value):
    with pytest.raises(APIError) as e:
        protocol.completion_params(CompletionRequest(prompt="x", **{field: value}))
    assert e.value.status == 400 and e.value.param == field and "SamplingParams" not in e.value.message


@pytest.mark.parametrize("field, value, neutral", [
    ("best_of", 3, 1), ("echo", True, False), ("suffix", "x", None)])
def test_features_the_engine_lacks_are_refused_unless_neutral(field, value, neutral):
    with pytest.raises(APIError) as e:
        protocol.completion_params(CompletionRequest(prompt="x", **{field: value}))
    assert e.value.param == field and e.value.code == "unsupported_parameter" and "not supported" in e.value.message
    if neutral is not None:
        protocol.completion_params(CompletionRequest(prompt="x", **{field: neutral}))
    # best_of equal to n asks for nothing more than n
    assert protocol.completion_params(CompletionRequest(prompt="x", n=3, best_of=3)).n == 3


def test_chat_only_fields_are_refused_too():
    msgs = [{"role": "user", "content": "hi"}]
    for field, value in (("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"})):
        with pytest.raises(APIError) as e:
            protocol.chat_params(ChatCompletionRequest(messages=msgs, **{field: value}))
        assert e.value.param == field
    protocol.chat_params(ChatCompletionRequest(messages=msgs, logprobs=False, response_format={"type": "text"}))


def test_n_penalties_bias_and_vllm_extras_map_to_sampling_params():
    req = CompletionRequest(prompt="x", n=3, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                            min_tokens=2, include_stop_str_in_output=True, skip_special_tokens=False,
                            logit_bias={"5": 1.5, " 7 ": -100})
    assert protocol.completion_params(req, vocab_size=10) == SamplingParams(
        n=3, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2, min_tokens=2,
        include_stop_str_in_output=True, skip_special_tokens=False, logit_bias={5: 1.5, 7: -100.0})
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2, frequency_penalty=2)
    assert protocol.chat_params(chat) == SamplingParams(max_tokens=None, n=2, frequency_penalty=2.0)


@pytest.mark.parametrize("bias, says", [({"abc": 1.0}, "not a token id"), ({"-3": 1.0}, "not a token id"),
                                        ({"1.5": 1.0}, "not a token id"), ({"10": 1.0}, "outside the model's vocab"),
                                        ({"3": 100.5}, "[-100, 100]"), ({"3": -101}, "[-100, 100]")])
def test_bad_logit_bias_is_a_400_naming_it(bias, says):
    for req in (CompletionRequest(prompt="x", logit_bias=bias),
                ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logit_bias=bias)):
        params = protocol.completion_params if isinstance(req, CompletionRequest) else protocol.chat_params
        with pytest.raises(APIError) as e:
            params(req, vocab_size=10)
        assert e.value.status == 400 and e.value.param == "logit_bias" and says in e.value.message


@pytest.mark.parametrize("field, value", [("n", 0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0), ("min_tokens", -1)])
def test_bad_n_and_penalties_are_400_naming_them(field, value):
    with pytest.raises(APIError) as e:
        protocol.completion_params(CompletionRequest(prompt="x", **{field: value}))
    assert e.value.status == 400 and e.value.param == field


def test_logprobs_fields_map_and_are_bounded_by_max_logprobs():
    msgs = [{"role": "user", "content": "hi"}]
    assert protocol.completion_params(CompletionRequest(prompt="x", logprobs=0)).logprobs == 0
    assert protocol.completion_params(CompletionRequest(prompt="x", logprobs=5), max_logprobs=5).logprobs == 5
    assert protocol.completion_params(CompletionRequest(prompt="x")).logprobs is None
    assert protocol.chat_params(ChatCompletionRequest(messages=msgs, logprobs=True)).logprobs == 0
    assert protocol.chat_params(ChatCompletionRequest(messages=msgs, logprobs=True, top_logprobs=3)).logprobs == 3
    assert protocol.chat_params(ChatCompletionRequest(messages=msgs, logprobs=False)).logprobs is None
    bad = [(protocol.completion_params, CompletionRequest(prompt="x", logprobs=6), "logprobs"),
           (protocol.completion_params, CompletionRequest(prompt="x", logprobs=-1), "logprobs"),
           (protocol.chat_params, ChatCompletionRequest(messages=msgs, logprobs=True, top_logprobs=6), "top_logprobs"),
           (protocol.chat_params, ChatCompletionRequest(messages=msgs, top_logprobs=2), "top_logprobs")]
    for params, req, field in bad:
        with pytest.raises(APIError) as e:
            params(req, max_logprobs=5)
        assert e.value.status == 400 and e.value.param == field, e.value.message


def test_strict_types_and_unknown_fields():
    for bad in ({"prompt": "x", "temperature": "0.5"}, {"prompt": "x", "stream": "yes"},
                {"prompt": "x", "max_tokens": 2.5}, {"prompt": "x", "temprature": 1}, {"prompt": 5},
                {"prompt": ["a", 1]}):
        with pytest.raises(pydantic.ValidationError):
            CompletionRequest.model_validate(bad)
    assert CompletionRequest.model_validate({"prompt": "x", "temperature": 1}).temperature == 1.0


def test_prompt_shapes():
    for given, want in (("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])):
        assert protocol.completion_prompts(CompletionRequest(prompt=given)) == want
    with pytest.raises(APIError):
        protocol.completion_prompts(CompletionRequest(prompt=[]))


def test_chat_messages_join_text_parts_and_keep_extra_fields():
    req = ChatCompletionRequest(messages=[
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "hi", "name": "bo"}])
    assert protocol.chat_messages(req) == [{"role": "system", "content": "be brief"},
                                           {"role": "assistant", "content": "", "tool_calls": []},
                                           {"role": "user", "content": "hi", "name": "bo"}]
    with pytest.raises(pydantic.ValidationError):   # images are not text
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(APIError):
        protocol.chat_messages(ChatCompletionRequest(messages=[]))


def _out(rid: str, prompt_len: int, tokens: int, reason: str) -> RequestOutput:
    comp = CompletionOutput(0, "t" * tokens, list(range(tokens)), reason)
    return RequestOutput(rid, None, list(range(prompt_len)), [comp], True)


def test_responses_carry_choices_in_order_and_usage():
    outs = [_out("a", 3, 2, "stop"), _out("b", 4, 5, "length")]
    body = protocol.ResponseBuilder(False, "cmpl-1", "m").response(outs)
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"] == "cmpl-1"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, "tt", "stop"),
                                                                                      (1, "ttttt", "length")]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    chat = protocol.ResponseBuilder(True, "c", "m")
    assert chat.response(outs[:1])["choices"][0]["message"] == {"role": "assistant", "content": "tt"}
    assert chat.chunk(0, "x", None, first=True)["choices"][0]["delta"] == {"role": "assistant", "content": "x"}
    assert chat.chunk(0, "y", "stop")["choices"][0] == {"index": 0, "delta": {"content": "y"}, "logprobs": None,
                                                       "finish_reason": "stop"}
    assert chat.usage_chunk(outs)["choices"] == [] and chat.usage_chunk(outs)["object"] == "chat.completion.chunk"


def _lp(token: int, logprob: float, rank: int) -> tuple[int, Logprob]:
    return token, Logprob(logprob, rank, f"<{token}>")


def test_n_choices_are_numbered_prompt_major_and_usage_sums_samples():
    def out(rid, prompt_len, sizes):
        comps = [CompletionOutput(j, "t" * k, list(range(k)), "length") for j, k in enumerate(sizes)]
        return RequestOutput(rid, None, list(range(prompt_len)), comps, True)

    body = protocol.ResponseBuilder(False, "c", "m", n=2).response([out("a", 3, [1, 2]), out("b", 4, [3, 4])])
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "t"), (1, "tt"), (2, "ttt"), (3, "tttt")]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17}


def test_logprobs_in_completion_and_chat_shapes():
    # Token 7 sampled at rank 2 with top-2 {3, 7}; token 9 sampled at rank 5, outside the top 2 {3, 4}.
    entries = [dict([_lp(7, -1.0, 2), _lp(3, -0.5, 1)]), dict([_lp(9, -4.0, 5), _lp(3, -0.1, 1), _lp(4, -2.5, 2)])]
    comp = CompletionOutput(0, "<7><9>", [7, 9], "stop", logprobs=entries)
    out = RequestOutput("a", None, [1], [comp], True)
    lps = protocol.ResponseBuilder(False, "c", "m", logprobs=2).response([out])["choices"][0]["logprobs"]
    assert lps == {"tokens": ["<7>", "<9>"], "token_logprobs": [-1.0, -4.0],
                   "top_logprobs": [{"<7>": -1.0, "<3>": -0.5}, {"<9>": -4.0, "<3>": -0.1, "<4>": -2.5}],
                   "text_offset": [0, 3]}
    chat = protocol.ResponseBuilder(True, "c", "m", logprobs=2).response([out])["choices"][0]["logprobs"]
    first, second = chat["content"]
    assert first["token"] == "<7>" and first["logprob"] == -1.0 and first["bytes"] == list(b"<7>")
    assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [("<3>", -0.5), ("<7>", -1.0)]
    assert [t["token"] for t in second["top_logprobs"]] == ["<3>", "<4>"]   # the top 2, not the sampled one
    assert protocol.ResponseBuilder(True, "c", "m").response([out])["choices"][0]["logprobs"] is None


def test_stream_chunks_follow_each_sample_once():
    """Two samples of one prompt (the second prompt of the request, n=2): each update carries
    every sample's state but only its own delta; chunks name the choice, its new tokens'
    logprobs, and each finish once."""
    e = [dict([_lp(t, -0.1 * t, 1)]) for t in range(4)]
    builder = protocol.ResponseBuilder(False, "c", "m", n=2, logprobs=0)

    def update(a, b, delta_of, delta_text, finished=False):
        comps = [CompletionOutput(i, text, ids, reason, delta_text=delta_text if i == delta_of else "",
                                  delta_token_ids=ids[-1:] if i == delta_of else [], logprobs=[e[t] for t in ids])
                 for i, (text, ids, reason) in enumerate((a, b))]
        return RequestOutput("r", None, [1], comps, finished)

    chunks = builder.stream_chunks(1, update(("x", [0], None), ("", [], None), 0, "x"))
    chunks += builder.stream_chunks(1, update(("x", [0], None), ("y", [1], None), 1, "y"))
    chunks += builder.stream_chunks(1, update(("xz", [0, 2], "length"), ("y", [1], None), 0, "z"))
    chunks += builder.stream_chunks(1, update(("xz", [0, 2], "length"), ("yw", [1, 3], "stop"), 1, "w", True))
    got = [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"],
            c["choices"][0]["logprobs"]["tokens"], c["choices"][0]["logprobs"]["text_offset"]) for c in chunks]
    assert got == [(2, "x", None, ["<0>"], [0]), (3, "y", None, ["<1>"], [0]),
                   (2, "z", "length", ["<2>"], [3]), (3, "w", "stop", ["<3>"], [3])]


@pytest.mark.parametrize("chat", [False, True])
def test_sse_chunks_are_the_json_of_chunk(chat):
    """The directly formatted events parse to exactly what `chunk` builds, for text that
    needs escaping (quotes, backslashes, newlines, control and non-ASCII characters)."""
    rng = random.Random(7)
    alphabet = ['"', "\\", "\n", "\t", "\x01", "é", "日", "😀", "a", " ", "}", "{", ","]
    builder = protocol.ResponseBuilder(chat, 'id-"quoted"', "mödel\\x")
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        reason, first, index = rng.choice([None, "stop", "length"]), rng.random() < 0.5, rng.randrange(0, 40)
        event = builder.sse_chunk(index, text, reason, first)
        assert event.startswith("data: ") and event.endswith("\n\n")
        assert json.loads(event[len("data: "):]) == builder.chunk(index, text, reason, first)
    lps = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": None, "text_offset": [0]}
    event = builder.sse_chunk(3, "a", None, False, lps)
    assert json.loads(event[len("data: "):]) == builder.chunk(3, "a", None, False, lps)
