"""Damaged GGUF files: each one either loads with exactly the original weights or fails with
one WeightLoadError; never another exception, a hang, or silently different weights.

The random cases (fixed seeds) flip, overwrite, insert and cut header bytes, truncate, and
swap metadata values and tensor fields; the named cases are the specific ways a reader goes
wrong. Flips inside the tensor data are not tried: GGUF has no checksum, so no reader can
notice them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.params import param_shapes
from nanoflow_jax.weights import WeightLoadError
from nanoflow_jax.weights.gguf_loader import read_gguf_model
from tests.weights.tiny_gguf import Raw, RawGGUF, V, write_tiny_gguf

CFG = ModelConfig(architecture="llama", vocab_size=112, hidden_size=64, intermediate_size=96, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, max_position_embeddings=256)
MERGES = ["3 4", "2 34", "5 6", "1 2", "4 5"]
CASE_SECONDS = 5  # one load takes milliseconds; anything near this is a hang


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[RawGGUF, dict]:
    """The valid file's parts and the weights it loads to (Q8_0 matrices, so block sizes matter)."""
    rng = np.random.default_rng(0)
    shapes = param_shapes(CFG)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k != "layers"}
    params["layers"] = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes["layers"].items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, params, CFG, qtype="Q8_0", tokenizer=dict(merges=MERGES, add_bos=True, add_eos=True))
    raw = RawGGUF.parse(path)
    assert raw.to_bytes() == path.read_bytes()  # the editable copy writes the file back exactly
    cfg, tokenizer, loaded = read_gguf_model(path, progress=False)
    assert cfg.vocab_size == tokenizer.vocab_size == CFG.vocab_size
    return raw, loaded


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def hang(*_: Any) -> None:
        raise TimeoutError(f"loading took over {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _load(path: Path) -> tuple[dict | None, str]:
    """(params, "") on success, (None, message) on WeightLoadError; anything else fails the test."""
    with _deadline(CASE_SECONDS):
        try:
            return read_gguf_model(path, progress=False)[2], ""
        except WeightLoadError as e:
            return None, str(e)


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_same(a[k], b[k]) if isinstance(a[k], dict) else np.array_equal(a[k], b[k]) for k in a)


def _check(path: Path, reference: dict, case: str) -> str:
    """Load `path`: the same weights or a WeightLoadError. Returns the error message ('' on success)."""
    try:
        params, message = _load(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in a library is a BaseException; name the mutation that escaped
        raise AssertionError(f"{case}: {type(e).__name__}: {e}") from e
    assert params is None or _same(params, reference), f"{case}: loaded different weights"
    return message


def _nbytes(dims: list[int], qtype: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return math.prod(dims) // block * size


# ---------------------------------------------------------------- random mutations


def _flip(rng: random.Random, data: bytearray, header_end: int) -> str:
    pos, bits = rng.randrange(header_end), rng.randrange(1, 256)
    data[pos] ^= bits
    return f"byte {pos} ^= {bits}"


# Values that break size arithmetic: zero, sign bits, all ones, and 2**32 (wraps a 32-bit product).
_WORDS = [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64 - 1]


def _overwrite(rng: random.Random, data: bytearray, header_end: int) -> str:
    pos, value = rng.randrange(header_end - 8), rng.choice(_WORDS)
    fmt = "<Q" if value >= 2 ** 32 or rng.random() < 0.5 else "<I"
    struct.pack_into(fmt, data, pos, value)
    return f"{fmt} {value} at byte {pos}"


def _splice(rng: random.Random, data: bytearray, header_end: int) -> str:
    """Bytes inserted or cut: every later field moves."""
    pos, n = rng.randrange(header_end), rng.randrange(1, 16)
    if rng.random() < 0.5:
        data[pos:pos] = rng.randbytes(n)
        return f"{n} bytes inserted at {pos}"
    del data[pos:pos + n]
    return f"{n} bytes cut at {pos}"


HEADER_MUTATIONS = {"flip": (_flip, 400, 1), "overwrite": (_overwrite, 200, 5), "splice": (_splice, 150, 6)}


@pytest.mark.parametrize("mode", sorted(HEADER_MUTATIONS))
def test_header_mutations(tmp_path, original, mode):
    mutate, count, seed = HEADER_MUTATIONS[mode]
    raw, ref = original
    data, header_end, rng = raw.to_bytes(), len(raw.header()), random.Random(seed)
    failed = 0
    for _ in range(count):
        bad = bytearray(data)
        case = mutate(rng, bad, header_end)
        (tmp_path / "bad.gguf").write_bytes(bad)
        failed += bool(_check(tmp_path / "bad.gguf", ref, case))
    assert failed > count // 2  # most mutations hit structure the reader checks


def test_truncations(tmp_path, original):
    raw, ref = original
    data = raw.to_bytes()
    rng = random.Random(2)
    _, dims, qtype, offset = raw.tensors[-1]
    needed = len(data) - len(raw.data) + offset + _nbytes(dims, qtype)  # only padding follows the last tensor
    cuts = sorted({0, 3, 4, 8, 24, len(raw.header()), needed - 1, *rng.sample(range(needed), 60)})
    for n in cuts:
        (tmp_path / "bad.gguf").write_bytes(data[:n])
        assert _check(tmp_path / "bad.gguf", ref, f"first {n} bytes"), f"a file cut to {n} bytes loaded"


_JUNK = [(V.INT32, -1), (V.UINT32, 0), (V.UINT64, 2 ** 62), (V.INT64, -2 ** 40), (V.FLOAT32, math.nan),
         (V.FLOAT64, -math.inf), (V.FLOAT32, 0.0), (V.STRING, "12"), (V.STRING, ""), (V.BOOL, True),
         (V.ARRAY, (V.INT32, [1, 2])), (V.ARRAY, (V.STRING, ["a", "b c"])), (V.ARRAY, (V.UINT8, [])),
         (V.UINT8, 255), (V.INT8, -128), (V.UINT16, 7)]


def test_metadata_value_swaps(tmp_path, original):
    raw, ref = original
    rng = random.Random(3)
    for key, _, _ in raw.kvs:
        for vtype, value in rng.sample(_JUNK, 4):
            bad = copy.deepcopy(raw)
            bad.kv(key)[1:] = [vtype, value]
            _check(bad.write(tmp_path / "bad.gguf"), ref, f"{key} = {vtype.name} {value!r}")


def test_tensor_field_changes(tmp_path, original):
    raw, ref = original
    rng = random.Random(4)
    for i in range(len(raw.tensors)):
        for _ in range(6):
            bad = copy.deepcopy(raw)
            t = bad.tensors[i]
            field = rng.randrange(1, 4)  # dims, type or data offset
            if field == 1:
                d = rng.randrange(len(t[1]))
                t[1][d] = rng.choice([0, 1, t[1][d] * 2, t[1][d] + 32, 2 ** 63, 2 ** 64 - 1])
            elif field == 2:
                t[2] = rng.choice([1, 2, 3, 8, 26, 99, 2 ** 32 - 1])
            else:
                t[3] = rng.choice([t[3] + 1, t[3] + 32, max(t[3] - 32, 0), 2 ** 63])
            case = f"tensor {t[0]} = {t[1:]}"
            _check(bad.write(tmp_path / "bad.gguf"), ref, case)


# ---------------------------------------------------------------- named cases


def _set(key: str, vtype: int, value: Any) -> Callable[[RawGGUF], None]:
    """Set (or add) one metadata value."""
    def change(raw: RawGGUF) -> None:
        found = [kv for kv in raw.kvs if kv[0] == key]
        if found:
            found[0][1:] = [vtype, value]
        else:
            raw.kvs.append([key, vtype, value])
    return change


def _drop(key: str) -> Callable[[RawGGUF], None]:
    return lambda raw: raw.kvs.remove(raw.kv(key))


def _tensor(i: int, field: int, value: Any) -> Callable[[RawGGUF], None]:
    """Set field 0 (name), 1 (dims), 2 (type) or 3 (data offset) of the i-th tensor info."""
    def change(raw: RawGGUF) -> None:
        raw.tensors[i][field] = value(raw.tensors[i][field]) if callable(value) else value
    return change


def _edit_list(key: str, edit: Callable[[list], Any]) -> Callable[[RawGGUF], None]:
    """Edit the items of an array value."""
    return lambda raw: edit(raw.kv(key)[2][1])


def _more_tokens(n: int) -> Callable[[RawGGUF], None]:
    def change(raw: RawGGUF) -> None:
        raw.kv(TOKENS)[2][1].extend(f"<extra{i}>" for i in range(n))
        raw.kv(TYPES)[2][1].extend([1] * n)
    return change


TOKENS, TYPES, MERGES_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"
NAMED = {
    # general.alignment: a positive power of two, or every tensor shifts
    "alignment_zero": (_set("general.alignment", V.UINT32, 0), "general.alignment is 0"),
    "alignment_negative": (_set("general.alignment", V.INT32, -32), "general.alignment is -32"),
    "alignment_not_power_of_two": (_set("general.alignment", V.UINT32, 48), "general.alignment is 48"),
    "alignment_string": (_set("general.alignment", V.STRING, "32"), "'general.alignment' must be an integer"),
    "alignment_array": (_set("general.alignment", V.ARRAY, (V.UINT32, [32])), "must be an integer"),
    # counts and arrays bounded by the file before anything is allocated
    "kv_count_huge": (lambda raw: setattr(raw, "counts", (len(raw.tensors), 2 ** 60)), "metadata key/value count"),
    "tensor_count_huge": (lambda raw: setattr(raw, "counts", (2 ** 60, len(raw.kvs))), "tensor count"),
    "array_count_past_end": (_set(TYPES, V.ARRAY, Raw(struct.pack("<IQ", V.INT32, 2 ** 40))),
                             "array 'tokenizer.ggml.token_type' count"),
    "string_array_count_past_end": (_set(TOKENS, V.ARRAY, Raw(struct.pack("<IQ", V.STRING, 2 ** 61))),
                                    "array 'tokenizer.ggml.tokens' count"),
    "string_length_past_end": (_set("general.name", V.STRING, Raw(struct.pack("<Q", 2 ** 63))), "runs past the end"),
    "arrays_nested_too_deep": (_set("general.tags", V.ARRAY, (V.ARRAY, [(V.ARRAY, [(V.UINT8, [1])])])), "nests arrays"),
    "unknown_value_type": (_set("general.name", 13, Raw(b"")), "unknown GGUF value type 13"),
    "unknown_array_element_type": (_set("general.tags", V.ARRAY, Raw(struct.pack("<IQ", 77, 1))),
                                   "unknown GGUF element type 77"),
    "key_not_utf8": (lambda raw: raw.kvs.append([b"general.\xff", V.UINT8, 1]), "not valid UTF-8"),
    "bool_byte_2": (_set("tokenizer.ggml.add_bos_token", V.BOOL, Raw(b"\x02")), "bool stored as byte 2"),
    "duplicate_metadata_key": (lambda raw: raw.kvs.append(["llama.context_length", V.UINT32, 512]),
                               "'llama.context_length' appears twice"),
    "version_4": (lambda raw: setattr(raw, "version", 4), "GGUF version 4 is not supported"),
    # config values: types, ranges, and no division by zero
    "head_count_zero": (_set("llama.attention.head_count", V.UINT32, 0), "head_count' must be positive"),
    "head_count_kv_zero": (_set("llama.attention.head_count_kv", V.UINT32, 0), "num_kv_heads must be an integer > 0"),
    "head_count_kv_not_dividing": (_set("llama.attention.head_count_kv", V.UINT32, 3), "multiple of num_kv_heads"),
    "embedding_not_multiple_of_heads": (_set("llama.attention.head_count", V.UINT32, 5), "not a multiple of"),
    "block_count_string": (_set("llama.block_count", V.STRING, "1"), "'llama.block_count' must be an integer"),
    "block_count_array": (_set("llama.block_count", V.ARRAY, (V.UINT32, [1])), "'llama.block_count' must be an"),
    "block_count_float": (_set("llama.block_count", V.FLOAT32, 1.0), "'llama.block_count' must be an integer"),
    "context_length_zero": (_set("llama.context_length", V.UINT32, 0), "max_position_embeddings must be an integer"),
    "rms_eps_nan": (_set("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, math.nan),
                    "rms_norm_eps must be a finite number > 0"),
    "rms_eps_zero": (_set("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 0.0), "rms_norm_eps must be"),
    "freq_base_zero": (_set("llama.rope.freq_base", V.FLOAT32, 0.0), "rope_theta must be a finite number > 0"),
    "freq_base_negative": (_set("llama.rope.freq_base", V.FLOAT32, -1e4), "rope_theta must be"),
    "freq_base_inf": (_set("llama.rope.freq_base", V.FLOAT64, math.inf), "rope_theta must be"),
    "freq_base_string": (_set("llama.rope.freq_base", V.STRING, "1e4"), "'llama.rope.freq_base' must be a number"),
    "vocab_smaller_than_embedding": (_set("llama.vocab_size", V.UINT32, 100), "'token_embd.weight' has shape"),
    "more_tokens_than_embedding_rows": (_more_tokens(8), "the tokenizer has 120 tokens"),
    "block_count_huge": (_set("llama.block_count", V.UINT64, 2 ** 62), "exceeds the file's 12 tensors"),
    "architecture_not_string": (_set("general.architecture", V.UINT32, 7), "'general.architecture' must be a string"),
    # tensor infos: names, dims, types, offsets
    "last_tensor_shrunk": (_tensor(-1, 2, 2), "tensor data ends at byte"),  # Q8_0 -> Q4_0: same dims, fewer bytes
    "trailing_bytes": (lambda raw: setattr(raw, "data", raw.data + bytes(100)), "tensor data ends at byte"),
    "output_name_damaged": (_tensor(2, 0, "oucput.weight"), "does not use ('oucput.weight')"),  # else: tied head
    "duplicate_tensor_name": (_tensor(2, 0, "token_embd.weight"), "tensor name 'token_embd.weight' appears twice"),
    "offset_unaligned": (_tensor(3, 3, lambda o: o + 4), "not a multiple of the alignment 32"),
    "offset_aligned_but_shifted": (_tensor(3, 3, lambda o: o + 32), "expected"),
    "offset_past_end": (_tensor(-1, 3, 2 ** 62), "expected"),
    "dim_2_to_62": (_tensor(0, 1, lambda d: [2 ** 62, *d[1:]]), "ends at byte"),
    "dims_product_wraps_to_0": (_tensor(0, 1, lambda d: [2 ** 32, 2 ** 32]), "ends at byte"),
    "dim_zero": (_tensor(0, 1, lambda d: [d[0], 0]), "zero dimension"),
    "no_dims": (_tensor(0, 1, []), "has 0 dimensions"),
    "five_dims": (_tensor(0, 1, lambda d: [*d, 1, 1, 1]), "has 5 dimensions"),
    "unknown_tensor_type": (_tensor(0, 2, 99), "unknown type 99"),
    "row_not_whole_blocks": (_tensor(0, 1, lambda d: [48, d[1]]), "not a multiple of the Q8_0 block size 32"),
    "unsupported_tensor_type": (_tensor(1, 2, 26), "uses quantization I32"),  # a 4-byte type like F32
    # tokenizer metadata
    "no_token_list": (_drop(TOKENS), "no token list"),
    "tokens_not_strings": (_set(TOKENS, V.ARRAY, (V.INT32, list(range(112)))), "must be an array of items each a str"),
    "token_types_short": (_edit_list(TYPES, list.pop), "has 111 entries for 112 tokens"),
    "token_type_unknown": (_edit_list(TYPES, lambda t: t.__setitem__(5, 9)), "token_type holds 9"),
    "merge_unknown_token": (_edit_list(MERGES_KEY, lambda m: m.append("x <zz>")), "is not two tokens"),
    "merge_join_missing": (_edit_list(MERGES_KEY, lambda m: m.append("a b")), "'a b' is not two tokens"),
    "merge_without_space": (_edit_list(MERGES_KEY, lambda m: m.append("ab")), "'ab' is not two tokens"),
    "merges_not_strings": (_set(MERGES_KEY, V.ARRAY, (V.UINT32, [1, 2])), "must be an array of items each a str"),
    "bos_out_of_range": (_set("tokenizer.ggml.bos_token_id", V.UINT32, 5000), "bos_token_id"),
    "bos_string": (_set("tokenizer.ggml.bos_token_id", V.STRING, "0"), "'tokenizer.ggml.bos_token_id' must be"),
    "eot_out_of_range": (_set("tokenizer.ggml.eot_token_id", V.UINT32, 112), "eot_token_id is 112, outside"),
    "tokenizer_model_not_string": (_set("tokenizer.ggml.model", V.UINT32, 2), "'tokenizer.ggml.model' must be a str"),
    "bos_token_with_colon": (_edit_list(TOKENS, lambda t: t.__setitem__(0, "<s>:1")), "cannot be added by a template"),
    "add_bos_not_bool": (_set("tokenizer.ggml.add_bos_token", V.UINT8, 1), "'tokenizer.ggml.add_bos_token' must be"),
}


@pytest.mark.parametrize("case", sorted(NAMED))
def test_named_damage(tmp_path, original, case):
    raw, ref = original
    change, match = NAMED[case]
    bad = copy.deepcopy(raw)
    change(bad)
    message = _check(bad.write(tmp_path / "bad.gguf"), ref, case)
    assert message, f"{case}: the damaged file loaded"
    assert match in message, message


def _relayout(raw: RawGGUF, align: int) -> None:
    """Re-pack the data with another alignment (and record it), as a writer would."""
    data = bytearray()
    for t in raw.tensors:
        size = _nbytes(t[1], t[2])
        chunk, t[3] = raw.data[t[3]:t[3] + size], len(data)
        data += chunk + bytes(-size % align)
    raw.data, raw.alignment = bytes(data), align
    _set("general.alignment", V.UINT32, align)(raw)


SAME = {
    "version_2": lambda raw: setattr(raw, "version", 2),
    "alignment_64": lambda raw: _relayout(raw, 64),
    "alignment_32_explicit": lambda raw: _relayout(raw, 32),
    "unknown_keys": _set("general.tags", V.ARRAY, (V.ARRAY, [(V.STRING, ["x"])])),
    "bos_token_with_space_and_braces": _edit_list(TOKENS, lambda t: t.__setitem__(0, "<s {seq} $B>")),
}


@pytest.mark.parametrize("case", sorted(SAME))
def test_valid_variants_load_the_same(tmp_path, original, case):
    raw, ref = original
    bad = copy.deepcopy(raw)
    SAME[case](bad)
    params, message = _load(bad.write(tmp_path / "ok.gguf"))
    assert params is not None, message
    assert _same(params, ref)


def test_load_model_raises_the_same_error(tmp_path, original):
    from nanoflow_jax.weights.loader import load_model

    bad = copy.deepcopy(original[0])
    NAMED["merge_join_missing"][0](bad)
    for weights in ("auto", "random"):  # random weights still read the config and tokenizer
        with pytest.raises(WeightLoadError, match="is not two tokens"):
            load_model(bad.write(tmp_path / "bad.gguf"), weights=weights, progress=False)
