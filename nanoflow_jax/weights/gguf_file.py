"""A small GGUF (v2/v3, little-endian) reader: header, metadata, tensor index, memory-mapped data.

`gguf.GGUFReader` turns every metadata array (49k vocabulary strings, 49k merges) into
numpy fields and indexes all tensors before returning, which costs seconds for a 135M
model. This reads the header once with `struct`, maps the file, and hands each tensor's
raw bytes to `gguf.quants.dequantize` only when asked.

The file is untrusted input: every count is bounded by the bytes left before anything is
allocated, sizes are Python ints (no wrap-around), and the layout rules llama.cpp enforces
(power-of-two alignment, tensors packed in order, each padded to it) are checked, so a
damaged file fails with one WeightLoadError instead of loading shifted or garbled weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nanoflow_jax.weights import gguf_quants
from nanoflow_jax.weights.errors import WeightLoadError

# GGUF value type -> struct format (scalars) or numpy dtype (arrays); 7 = bool, 8 = string, 9 = array.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
             12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays of arrays are legal GGUF but no model key nests deeper; the cap bounds the recursion.
_MAX_ARRAY_DEPTH = 2
# Smallest encodings, to bound a count by the bytes left before reading its items.
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MIN_ITEM_BYTES = {_STRING: 8, _ARRAY: 4 + 8}


class _Corrupt(ValueError):
    """A structural problem found while parsing; `_reading` reports it as a WeightLoadError."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (struct.error, _Corrupt) as e:
        raise WeightLoadError(f"{path} is a truncated or corrupt GGUF file ({e}); download it again") from e


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dims fastest-first; reversed here)
    qtype: int              # gguf.GGMLQuantizationType value
    offset: int             # absolute byte offset in the file
    nbytes: int

    @property
    def qtype_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name


class _Cursor:
    """Sequential little-endian reads over the mapped header (struct.error past the end)."""

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def left(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def bounded(self, count: int, item_bytes: int, what: str) -> int:
        """`count` items of at least `item_bytes` each must fit in the rest of the file."""
        if count * item_bytes > self.left():
            raise _Corrupt(f"{what} count {count} needs at least {count * item_bytes} bytes, "
                           f"only {self.left()} are left after byte {self.pos}")
        return count

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q")
        if n > self.left():
            raise _Corrupt(f"{what} of {n} bytes at byte {self.pos} runs past the end of the file")
        start, self.pos = self.pos, self.pos + n
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what} at byte {start} is not valid UTF-8") from e

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(f"the value of {key!r}")
        if vtype == _BOOL:
            (b,) = self.unpack("<B")
            if b > 1:
                raise _Corrupt(f"{key!r} is a bool stored as byte {b}, not 0 or 1")
            return bool(b)
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype])[0]
        if vtype == _ARRAY:
            return self._array(key, depth)
        raise _Corrupt(f"{key!r} has unknown GGUF value type {vtype} (byte {self.pos - 4})")

    def _array(self, key: str, depth: int) -> list[Any]:
        if depth >= _MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{key!r} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        etype, count = self.unpack("<IQ")
        if etype in _NP_DTYPE:  # numeric arrays in one read
            dtype = np.dtype(_NP_DTYPE[etype])
            self.bounded(count, dtype.itemsize, f"array {key!r}")
            start, self.pos = self.pos, self.pos + count * dtype.itemsize
            # A bytes copy, not a view: a live view of the map would stop it from closing.
            arr = np.frombuffer(self.buf[start:self.pos], dtype=dtype)
            if etype == _BOOL:
                if count and arr.max() > 1:
                    raise _Corrupt(f"bool array {key!r} holds a byte other than 0 or 1")
                return arr.astype(bool).tolist()
            return arr.tolist()
        if etype not in _MIN_ITEM_BYTES:
            raise _Corrupt(f"array {key!r} has unknown GGUF element type {etype}")
        self.bounded(count, _MIN_ITEM_BYTES[etype], f"array {key!r}")
        return [self.value(etype, key, depth + 1) for _ in range(count)]


def _alignment(meta: Mapping[str, Any]) -> int:
    align = meta_value(meta, "general.alignment", int, DEFAULT_ALIGNMENT, error=_Corrupt)
    if align <= 0 or align & (align - 1):
        raise _Corrupt(f"general.alignment is {align}, but the GGUF spec requires a positive power of two "
                       f"such as the default {DEFAULT_ALIGNMENT}")
    return align


def _header(buf: mmap.mmap, path: Path) -> tuple[_Cursor, int, dict[str, Any]]:
    if buf[:4] != b"GGUF":
        raise WeightLoadError(f"{path} is not a GGUF file (magic bytes {bytes(buf[:4])!r}, expected b'GGUF')")
    cur = _Cursor(buf, 4)
    (version,) = cur.unpack("<I")
    if version not in (2, 3):
        raise WeightLoadError(f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian); "
                              "re-convert the model with a current llama.cpp")
    n_tensors, n_kv = cur.unpack("<QQ")
    cur.bounded(n_kv, _MIN_KV_BYTES, "metadata key/value")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in meta:  # which copy is meant is unknowable, so neither is trusted
            raise _Corrupt(f"metadata key {key!r} appears twice")
        (vtype,) = cur.unpack("<I")
        meta[key] = cur.value(vtype, key)
    _alignment(meta)
    cur.bounded(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor")
    return cur, n_tensors, meta


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a bool", str: "a string", list: "an array"}


def _has_kind(value: Any, kind: type) -> bool:
    if kind is float:  # an integer-typed GGUF value is a valid number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def meta_value(meta: Mapping[str, Any], key: str, kind: type, default: Any = None, *, item: type | None = None,
               error: type[ValueError] = WeightLoadError) -> Any:
    """`meta[key]` checked to be a `kind` (int, float, bool, str or list, whose items are `item`s),
    or `default` when the key is absent. A wrong type raises `error` naming the key: int() or
    float() of a string or array would accept or crash on a damaged file instead."""
    if key not in meta:
        return default
    value = meta[key]
    if not _has_kind(value, kind):
        raise error(f"GGUF metadata {key!r} must be {_KIND_NAMES[kind]}, got {type(value).__name__} "
                    f"{_short(value)}: the file is corrupt or was written by a broken converter")
    for i, v in enumerate(value if item is not None else ()):
        if not _has_kind(v, item):
            raise error(f"GGUF metadata {key!r} must be an array of items each {_KIND_NAMES[item]}, but item {i} is "
                        f"{type(v).__name__} {_short(v)}: the file is corrupt")
    return float(value) if kind is float else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _open_map(path: Path) -> tuple[Any, mmap.mmap]:
    if not path.is_file():
        raise WeightLoadError(f"GGUF file not found: {path}")
    f = open(path, "rb")
    try:
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:  # an empty file cannot be mapped
        f.close()
        raise WeightLoadError(f"{path} is empty, not a GGUF file") from e


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata (what a tokenizer or config needs)."""
    path = Path(path)
    f, buf = _open_map(path)
    try:
        with _reading(path):
            return _header(buf, path)[2]
    finally:
        buf.close()
        f.close()


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _tensor_index(cur: _Cursor, n_tensors: int, align: int) -> dict[str, TensorInfo]:
    """Read the tensor infos and check each tensor's type, size and place in the data section."""
    import gguf

    raw = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        (n_dims,) = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = cur.unpack(f"<{n_dims}Q")
        qtype, offset = cur.unpack("<IQ")
        raw.append((name, dims, qtype, offset))
    data_start = _round_up(cur.pos, align)
    tensors: dict[str, TensorInfo] = {}
    expected = 0  # llama.cpp's rule: tensors are packed in order, each padded to the alignment
    for name, dims, qtype, offset in raw:
        if name in tensors:
            raise _Corrupt(f"tensor name {name!r} appears twice")
        if 0 in dims:
            raise _Corrupt(f"tensor {name!r} has a zero dimension in {list(dims)}")
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise _Corrupt(f"tensor {name!r} has unknown type {qtype} (corrupt, or a type newer than the gguf package)")
        qname = gguf.GGMLQuantizationType(qtype).name
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        if dims[0] % block:
            raise _Corrupt(f"tensor {name!r}: its row length {dims[0]} is not a multiple of the {qname} block size "
                           f"{block}")
        nbytes = math.prod(dims) // block * type_size  # Python ints: a huge dim cannot wrap to a small size
        if offset % align:
            raise _Corrupt(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {align}")
        if offset != expected:
            raise _Corrupt(f"tensor {name!r} has data offset {offset}, expected {expected} (tensors are stored in "
                           f"order, each padded to {align} bytes)")
        end = data_start + offset + nbytes
        if end > len(cur.buf):
            raise _Corrupt(f"tensor {name!r} ({qname}, dims {list(dims)}) ends at byte {end}, "
                           f"the file has {len(cur.buf)}")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
        expected = _round_up(offset + nbytes, align)
    # The file ends with the last tensor (padded or not): more bytes mean the last tensor's
    # recorded size shrank, e.g. through a damaged type field, which nothing else detects.
    if len(cur.buf) > data_start + expected:
        raise _Corrupt(f"the file has {len(cur.buf)} bytes but its tensor data ends at byte {data_start + expected}: "
                       "the last tensor's recorded type or size is wrong")
    return tensors


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (name -> TensorInfo) and `dequantize(name)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file, self._buf = _open_map(self.path)
        try:
            with _reading(self.path):
                cur, n_tensors, self.metadata = _header(self._buf, self.path)
                self.tensors: dict[str, TensorInfo] = _tensor_index(cur, n_tensors, _alignment(self.metadata))
        except WeightLoadError:
            self.close()
            raise

    def close(self) -> None:
        self._buf.close()
        self._file.close()

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, shaped [rows..., bytes per row] (what gguf.quants.dequantize takes)."""
        info = self.tensors[name]
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)

    def dequantize(self, name: str) -> np.ndarray:
        import gguf

        info = self.tensors[name]
        if info.qtype_name in gguf_quants.fast_qtypes():  # one numpy pass, not gguf's row groups
            return gguf_quants.dequantize(self.raw(name), info.qtype_name).reshape(info.shape)
        arr = gguf.quants.dequantize(self.raw(name), gguf.GGMLQuantizationType(info.qtype))
        return np.asarray(arr, dtype=np.float32).reshape(info.shape)
