"""A small GGUF (v2/v3, little-endian) reader: header, metadata, tensor index, memory-mapped data.

`gguf.GGUFReader` turns every metadata array (49k vocabulary strings, 49k merges) into
numpy fields and indexes all tensors before returning, which costs seconds for a 135M
model. This reads the header once with `struct`, maps the file, and hands each tensor's
raw bytes to `gguf.quants.dequantize` only when asked.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from nanoflow_jax.weights import gguf_quants
from nanoflow_jax.weights.errors import WeightLoadError

# GGUF value type -> struct format (scalars) or numpy dtype (arrays); 8 = string, 9 = array.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
             12: "<f8"}
DEFAULT_ALIGNMENT = 32


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
    """Sequential little-endian reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype])[0]
        if vtype == 9:
            etype, count = self.unpack("<IQ")
            if etype in _NP_DTYPE:  # numeric arrays in one read
                arr = np.frombuffer(self.buf, dtype=_NP_DTYPE[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise struct.error(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _header(buf: mmap.mmap, path: Path) -> tuple[_Cursor, int, dict[str, Any]]:
    if buf[:4] != b"GGUF":
        raise WeightLoadError(f"{path} is not a GGUF file (magic bytes {bytes(buf[:4])!r}, expected b'GGUF')")
    cur = _Cursor(buf, 4)
    (version,) = cur.unpack("<I")
    if version not in (2, 3):
        raise WeightLoadError(f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian); "
                              "re-convert the model with a current llama.cpp")
    n_tensors, n_kv = cur.unpack("<QQ")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("<I")
        meta[key] = cur.value(vtype)
    return cur, n_tensors, meta


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
        return _header(buf, path)[2]
    except struct.error as e:
        raise WeightLoadError(f"{path} is a truncated or corrupt GGUF file ({e}); download it again") from e
    finally:
        buf.close()
        f.close()


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (name -> TensorInfo) and `dequantize(name)`."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._file, self._buf = _open_map(self.path)
        try:
            cur, n_tensors, self.metadata = _header(self._buf, self.path)
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                (n_dims,) = cur.unpack("<I")
                dims = cur.unpack(f"<{n_dims}Q")
                qtype, offset = cur.unpack("<IQ")
                infos.append((name, tuple(int(d) for d in reversed(dims)), int(qtype), int(offset)))
        except struct.error as e:
            raise WeightLoadError(f"{self.path} is a truncated or corrupt GGUF file ({e}); download it again") from e
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            if qtype not in gguf.GGML_QUANT_SIZES:
                raise WeightLoadError(f"{self.path}: tensor {name!r} has unknown type {qtype}: corrupt or too new")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            nbytes = int(np.prod(shape)) // block * type_size
            info = TensorInfo(name, shape, qtype, data_start + offset, nbytes)
            if info.offset + nbytes > len(self._buf):
                raise WeightLoadError(f"{self.path} is a truncated or corrupt GGUF file (tensor {name!r} ends at byte "
                                      f"{info.offset + nbytes}, the file has {len(self._buf)}); download it again")
            self.tensors[name] = info

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
