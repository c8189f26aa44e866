"""Write tiny GGUF files: a random Llama laid out the way llama.cpp's converter does it, a
byte-level BPE vocabulary, and `RawGGUF`, an editable copy of a file's parts that can write
files a correct writer never would (for the corruption tests)."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.weights import names

# One token per printable ASCII character plus GPT-2's byte-level space and newline.
BYTE_CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (the converter's permutation)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(w: gguf.GGUFWriter, *, model: str = "gpt2", pre: str | None = "gpt2", merges: Sequence[str] = (),
                  add_bos: bool = False, add_eos: bool = False, extra_tokens: Sequence[str] = (),
                  vocab_size: int | None = None) -> None:
    """Byte-level BPE metadata: <s> (BOS, id 0) and </s> (EOS, id 1) as control tokens, one token per
    byte character, each merge's join, `extra_tokens`, then unused padding up to `vocab_size`."""
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    tokens = ["<s>", "</s>", *BYTE_CHARS, *[m.replace(" ", "") for m in merges], *extra_tokens]
    types = [3, 3] + [1] * (len(tokens) - 2)
    if vocab_size is not None:
        assert vocab_size >= len(tokens), (vocab_size, len(tokens))
        tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
        types += [5] * (vocab_size - len(types))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizer_gguf(path: Path, **tokenizer: Any) -> Path:
    """A GGUF with only tokenizer metadata (see `add_tokenizer` for the keywords)."""
    w = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(w, **tokenizer)
    _finish(w)
    return path


def write_tiny_gguf(path, params, cfg: ModelConfig, qtype: str = "F32", arch: str = "llama",
                    drop: str | None = None, override_ffn: int | None = None,
                    tokenizer: dict[str, Any] | None = None) -> None:
    """`tokenizer`: when given, the file also carries a byte-level BPE tokenizer of `cfg.vocab_size`
    tokens (the dict holds `add_tokenizer`'s keywords)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(override_ffn or cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        add_tokenizer(w, vocab_size=cfg.vocab_size, **tokenizer)
    tensors = names.export(params, cfg, names.GGUF_LAYER, names.GGUF_TOP)
    q = gguf.GGMLQuantizationType[qtype]
    for name, arr in tensors.items():
        if name == drop:
            continue
        arr = np.asarray(arr, np.float32)
        if ".attn_q." in name:
            arr = permute_like_llama_cpp(arr, cfg.num_heads)
        elif ".attn_k." in name:
            arr = permute_like_llama_cpp(arr, cfg.num_kv_heads)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, arr)  # norms stay F32, as llama.cpp keeps them
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
    _finish(w)


# ---------------------------------------------------------------- raw files

V = gguf.GGUFValueType
_SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
               V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


class Raw(bytes):
    """A metadata value written verbatim (after its type), whatever the type says it should be."""


@dataclasses.dataclass
class RawGGUF:
    """A GGUF file as editable parts. `kvs`: [key, value type, value], an array's value being
    (element type, items); `tensors`: [name, dims in GGUF order, qtype, data offset]."""

    kvs: list[list[Any]]
    tensors: list[list[Any]]
    data: bytes
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT  # the padding written before the data
    version: int = 3
    counts: tuple[int, int] | None = None  # (tensors, key/values) to write instead of the true counts

    @classmethod
    def parse(cls, path: Path) -> RawGGUF:
        """Read with the `gguf` package's own reader (independent of the loader under test)."""
        reader = gguf.GGUFReader(path)
        kvs = []
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):  # the header's version and counts
                continue
            value = field.contents()
            if field.types[0] == V.ARRAY:
                value = (field.types[1], value)
            kvs.append([key, field.types[0], value])
        tensors = []
        for t in reader.tensors:
            _, _, _, dims, _, offset = t.field.parts
            tensors.append([t.name, [int(d) for d in dims], int(t.tensor_type), int(offset[0])])
        return cls(kvs, tensors, bytes(reader.data[reader.data_offset:]), reader.alignment)

    def kv(self, key: str) -> list[Any]:
        return next(kv for kv in self.kvs if kv[0] == key)

    def tensor(self, name: str) -> list[Any]:
        return next(t for t in self.tensors if t[0] == name)

    def header(self) -> bytes:
        counts = self.counts or (len(self.tensors), len(self.kvs))
        out = [b"GGUF", struct.pack("<IQQ", self.version, *counts)]
        for key, vtype, value in self.kvs:
            out += [_string(key), struct.pack("<I", vtype), _value(vtype, value)]
        for name, dims, qtype, offset in self.tensors:
            out += [_string(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims), struct.pack("<IQ", qtype, offset)]
        return b"".join(out)

    def to_bytes(self) -> bytes:
        head = self.header()
        return head + bytes(-len(head) % self.alignment) + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def _string(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if vtype == V.STRING:
        return _string(value)
    if vtype == V.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_SCALAR_FMT[vtype], value)
