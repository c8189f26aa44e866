"""Streams that hold back a possible stop string, and one LLM shared by several callers:
threads calling generate, a stream beside a generate, two streams interleaved in one
thread. Each caller gets exactly its own outputs, equal to a run on its own."""

from __future__ import annotations

import random
import threading

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine.sequence import Sequence
from nanoflow_jax.engine.stop import finish_check
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _text_seq(stop: list[str], max_tokens: int = 100) -> Sequence:
    return Sequence(request_id="s", arrival=0, prompt=None, prompt_token_ids=[1],
                    params=SamplingParams(stop=stop), seed=0, max_tokens=max_tokens)


def test_stream_holds_back_a_possible_stop_string():
    """With stop=["Paris."] the pieces ' Paris' then '.' stream ' ' then '' (the final text)."""
    seq = _text_seq(["Paris."])
    deltas = []
    for piece in (" Par", "is", "."):
        seq.output_token_ids.append(1)
        end = finish_check(seq, 1, piece, frozenset())
        if end:
            seq.status, seq.finish_reason = seq.status.FINISHED, end[0]
        deltas.append(seq.take_delta())
    assert deltas == [" ", "", ""] and seq.text == " " and seq.finish_reason == "stop"

    seq = _text_seq(["ab", "xyz"])   # not a stop after all: released as soon as that is sure
    for piece, released in (("1x", "1"), ("y", ""), ("a", "xy"), ("c", "ac")):
        seq.output_token_ids.append(1)
        assert finish_check(seq, 1, piece, frozenset()) is None
        assert seq.take_delta() == released
    seq.text += "xy"
    assert seq.take_delta() == ""
    seq.status = seq.status.FINISHED   # finishing (length, EOS, abort) flushes what was held
    assert seq.take_delta() == "xy"


def test_fuzz_hold_back_is_the_longest_stop_prefix():
    """The held-back tail against a brute-force search (fixed seed, small alphabet)."""
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        seq = _text_seq(stops)
        seq.text = text
        held = max((k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])),
                   default=0)
        assert seq.take_delta() == text[: len(text) - held], (text, stops)


def test_stream_deltas_add_up_with_multi_token_stop_strings(tokenizer):
    llm = make_llm(tokenizer=tokenizer)
    prompts = ["The capital of France is", "héllo wörld ✓", "a"]
    base = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    texts = [b.outputs[0].text for b in base]
    # A 4-char stop (4+ byte tokens) in the middle of two texts; for a text that ends in a
    # whole character, a stop starting with that character (held back, then flushed at
    # max_tokens), and one that never appears.
    k = next(i for i, t in enumerate(texts) if not t.endswith("\ufffd"))
    stops = [[t[8:12]] for t in texts]
    stops[k] = [texts[k][-1] + "\x00\x01", "\x02never"]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=s) for s in stops]
    final = {o.request_id: o for o in llm.generate(prompts, params)}
    deltas: dict[str, list] = {}
    for upd in llm.stream(prompts, params):
        deltas.setdefault(upd.prompt, []).append(upd)
    for p, o in zip(prompts, final.values()):
        ups = deltas[p]
        assert sum(u.finished for u in ups) == 1 and ups[-1].finished
        assert "".join(u.outputs[0].delta_text for u in ups) == ups[-1].outputs[0].text == o.outputs[0].text
        for u in ups:   # the running text is what was streamed so far
            assert o.outputs[0].text.startswith(u.outputs[0].text)
    outs = list(final.values())
    for i, (o, t) in enumerate(zip(outs, texts)):
        if i == k:
            assert o.outputs[0].finish_reason == "length" and o.outputs[0].text == t
        else:
            assert o.outputs[0].finish_reason == "stop" and o.outputs[0].text == t[: t.find(stops[i][0])]
    assert llm.engine.blocks.all_free()


@pytest.fixture(scope="module")
def work() -> tuple[list[list[int]], list[list[int]]]:
    a = random_prompts(6, [5, 40, 9, 33, 2, 17], seed=21)
    b = random_prompts(6, [12, 3, 50, 8, 27, 6], seed=22)
    return a, b


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_two_threads_share_one_llm(work):
    a, b = work
    ref = reference_greedy(a + b, GREEDY.max_tokens)
    llm = make_llm()
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(name: str, prompts: list[list[int]]) -> None:
        try:
            for _ in range(2):
                results[name] = _tokens(llm.generate(prompts, GREEDY))
        except BaseException as e:   # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == {"a": ref[:6], "b": ref[6:]}
    assert not llm.engine.has_unfinished() and llm.engine.blocks.all_free() and not llm._routes


def test_stream_beside_generate_and_interleaved_streams(work):
    a, b = work
    ref = reference_greedy(a + b, GREEDY.max_tokens)
    llm = make_llm()
    streamed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for upd in llm.stream(a, GREEDY):
                streamed.setdefault(upd.request_id, []).extend(upd.outputs[0].delta_token_ids)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    got_b = _tokens(llm.generate(b, GREEDY))
    t.join(timeout=300)
    assert not errors, errors
    assert got_b == ref[6:] and list(streamed.values()) == ref[:6]

    # Two streams stepped alternately in one thread: neither takes the other's updates.
    per: list[dict[str, list[int]]] = [{}, {}]
    live = [iter(llm.stream(a, GREEDY)), iter(llm.stream(b, GREEDY))]
    while any(live):
        for k, s in enumerate(live):
            if s is None:
                continue
            upd = next(s, None)
            if upd is None:
                live[k] = None
            else:
                per[k].setdefault(upd.request_id, []).extend(upd.outputs[0].delta_token_ids)
    assert list(per[0].values()) == ref[:6] and list(per[1].values()) == ref[6:]

    early = llm.stream(b, GREEDY)   # a stream dropped early aborts its requests
    next(early)
    early.close()
    assert not llm.engine.scheduler.has_unfinished() and llm.engine.blocks.all_free() and not llm._routes


def test_request_aborted_behind_the_llm_raises_instead_of_hanging(work):
    llm = make_llm()
    stream = llm.stream(work[0][:2], GREEDY)   # requests gen-0 and gen-1 of a fresh LLM
    next(stream)
    for rid in ("gen-0", "gen-1"):
        llm.engine.abort(rid)
    with pytest.raises(RuntimeError, match="without a final update"):
        list(stream)
    assert not llm._routes and llm.engine.blocks.all_free()
