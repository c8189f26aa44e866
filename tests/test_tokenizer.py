"""Tokenizer: parity with transformers (committed fixture), digit modes, streaming, loaders."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from nanoflow_jax.tokenizer import Tokenizer, TokenizerError, read_gguf_metadata
from tests.weights.tiny_gguf import write_tokenizer_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_tokenizer_reference.json"
REF = json.loads(FIXTURE.read_text(encoding="utf-8"))
CASES = REF["cases"]
IDS = [repr(c["text"])[:40] for c in CASES]


@pytest.fixture(scope="module")
def tok(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def tok_nosplit(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path, split_digits=False)


def test_fixture_covers_both_digit_modes():
    # Without a string whose ids differ between the modes, the digit tests below prove nothing.
    assert any(c["ids_transformers"] != c["ids_split_digits"] for c in CASES)
    assert "Digits(individual_digits=True)" in REF["split_digits_pre_tokenizer"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_split_matches_transformers_gguf_tokenizer(tok_nosplit, case):
    assert tok_nosplit.encode(case["text"]) == case["ids_transformers"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_default_splits_digits_like_smollm2(tok, case):
    assert tok.encode(case["text"]) == case["ids_split_digits"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_matches_transformers_and_round_trips(tok, case):
    assert tok.decode(case["ids_transformers"]) == case["decoded_skip_special"]
    assert tok.decode(tok.encode(case["text"]), skip_special_tokens=False) == case["text"]


def test_digit_modes_differ_where_expected(tok, tok_nosplit):
    text = " ²³"
    assert [tok.id_to_token(i) for i in tok.encode(text)] == ["Ġ", "Â²", "Â³"]
    assert tok_nosplit.encode(text) != tok.encode(text)
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]


def test_special_tokens_and_properties(tok):
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.bos_token_id == REF["bos_token_id"] == 1
    assert tok.eos_token_id == REF["eos_token_id"] == 2
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == frozenset({2, 0})  # <|im_end|> and <|endoftext|>
    assert tok.vocab_size == REF["vocab_size"] == 49152
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    # The GGUF sets add_bos_token False, so add_special_tokens adds nothing.
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert tok.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stream_decoder_concatenates_to_full_decode(tok, case):
    ids = tok.encode(case["text"])
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("你😀")
    assert len(ids) > 2  # byte-level tokens split these characters
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    assert pieces.count("") >= 1 and "".join(pieces) == "你😀"
    # A stream cut inside a character ends with a replacement character, not silently.
    dec = tok.stream_decoder()
    assert dec.add(ids[0]) == "" and dec.flush() == "\ufffd"


def test_stream_decoder_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>")
    skip = tok.stream_decoder()
    keep = tok.stream_decoder(skip_special_tokens=False)
    assert skip.add_many(ids) + skip.flush() == "assistant\nOK"
    assert keep.add_many(ids) + keep.flush() == "<|im_start|>assistant\nOK<|im_end|>"


def test_from_open_reader_matches_path(default_gguf_path, tok):
    reader = gguf.GGUFReader(default_gguf_path)
    from_reader = Tokenizer.from_gguf(reader)
    meta = read_gguf_metadata(default_gguf_path)
    assert meta["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert meta["tokenizer.ggml.merges"] == reader.fields["tokenizer.ggml.merges"].contents()
    assert meta["tokenizer.ggml.token_type"] == reader.fields["tokenizer.ggml.token_type"].contents()
    from_meta = Tokenizer.from_gguf(meta)
    for case in CASES:
        assert from_reader.encode(case["text"]) == tok.encode(case["text"]) == from_meta.encode(case["text"])
    assert from_reader.chat_template == tok.chat_template and from_reader.eos_token_ids == tok.eos_token_ids


def test_from_hf_dir(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "chat_template": "{{ 'T' }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert hf.eos_token_ids == frozenset({0, 2, 5})
    assert hf.chat_template == "{{ 'T' }}"
    for case in CASES:
        assert hf.encode(case["text"]) == tok.encode(case["text"])
    # A chat_template.jinja file (newer transformers) wins over the config's string.
    (tmp_path / "chat_template.jinja").write_text("{{ 'J' }}")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J"


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ------------------------------------------------------------ synthetic GGUF files

# Merges chosen so that each way of cutting "123456" gives different tokens.
_DIGIT_MERGES = ["3 4", "2 34", "5 6", "1 2", "4 5"]


def _pieces(t: Tokenizer, text: str) -> list[str]:
    return [t.id_to_token(i) for i in t.encode(text)]


@pytest.mark.parametrize("pre, split_digits, expected", [
    ("gpt2", None, ["1", "234", "56"]),         # one pre-token "123456": BPE merges across digits
    ("gpt2", True, list("123456")),             # forced individual digits
    ("smollm", None, list("123456")),           # smollm splits digits by default
    ("smollm", False, ["1", "234", "56"]),      # ... unless asked not to (transformers' behaviour)
    ("llama-bpe", None, ["12", "3", "4", "56"]),  # llama3 regex: groups of up to 3 digits
    ("qwen2", None, list("123456")),            # qwen2 regex: single digits
])
def test_pre_tokenizer_types(tmp_path, pre, split_digits, expected):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", pre=pre, merges=_DIGIT_MERGES)
    t = Tokenizer.from_gguf(path, split_digits=split_digits)
    assert _pieces(t, "123456") == expected


def test_unknown_pre_tokenizer_warns(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", pre="made-up-pre")
    with pytest.warns(UserWarning, match="made-up-pre"):
        t = Tokenizer.from_gguf(path)
    assert _pieces(t, "ab c") == ["a", "b", "Ġ", "c"]


def test_add_bos_token_from_gguf(tmp_path):
    t = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", add_bos=True))
    assert t.encode("a", add_special_tokens=True) == [0, t.token_to_id("a")]
    assert t.encode("a") == [t.token_to_id("a")]


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", model="llama")
    with pytest.raises(TokenizerError, match="'llama'.*not supported"):
        Tokenizer.from_gguf(path)


@pytest.mark.parametrize("key, value, match", [
    ("tokenizer.ggml.merges", ["a b"], r"merges\[0\] = 'a b' is not two tokens"),  # 'ab' is no token
    ("tokenizer.ggml.merges", ["ab"], r"merges\[0\] = 'ab' is not two tokens"),
    ("tokenizer.ggml.merges", [1], "'tokenizer.ggml.merges' must be an array of items each a string"),
    ("tokenizer.ggml.tokens", "abc", "'tokenizer.ggml.tokens' must be an array"),
    ("tokenizer.ggml.tokens", [], "no token list"),
    ("tokenizer.ggml.token_type", [1, 1], "token_type has 2 entries for 98 tokens"),
    ("tokenizer.ggml.bos_token_id", 98, "bos_token_id is 98, outside the 98-token vocabulary"),
    ("tokenizer.ggml.pre", 3, "'tokenizer.ggml.pre' must be a string"),
])
def test_broken_gguf_vocabulary_is_a_tokenizer_error(tmp_path, key, value, match):
    meta = read_gguf_metadata(write_tokenizer_gguf(tmp_path / "t.gguf"))
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_gguf({**meta, key: value})


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(TypeError, match="a path, a gguf.GGUFReader or its metadata dict"):
        Tokenizer.from_gguf(42)


def test_hf_reference_prompt_tokens(tok):
    # The model-parity fixture's prompt must tokenize here exactly as transformers did.
    import numpy as np

    fixtures = Path(__file__).parent / "fixtures"
    meta = json.loads((fixtures / "smollm2_hf_reference.json").read_text(encoding="utf-8"))
    ref = np.load(fixtures / "smollm2_hf_reference.npz")
    assert tok.apply_chat_template(meta["messages"]) == meta["prompt_text"]
    assert tok.encode(meta["prompt_text"]) == ref["input_ids"].tolist()
    assert tok.decode(ref["greedy_ids"].tolist()) == str(ref["greedy_text"]) == meta["greedy_text"]
