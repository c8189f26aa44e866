"""The numpy GGUF dequantisers against the `gguf` package's, on fresh random blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from nanoflow_jax.weights import gguf_quants


def _random_blocks(rng: np.random.Generator, qtype: str, rows: int, blocks_per_row: int) -> np.ndarray:
    block_bytes, heads = gguf_quants._LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    # Finite f16 scales (random bytes could be inf/NaN, which both would pass through).
    scales = rng.uniform(-2.0, 2.0, size=(rows, blocks_per_row, heads)).astype(np.float16)
    raw[..., : 2 * heads] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2 * heads)
    return raw.reshape(rows, blocks_per_row * block_bytes)


@pytest.mark.parametrize("qtype", gguf_quants.fast_qtypes())
def test_matches_the_gguf_package(qtype):
    rng = np.random.default_rng()
    raw = _random_blocks(rng, qtype, rows=int(rng.integers(1, 9)), blocks_per_row=int(rng.integers(1, 6)))
    want = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]), np.float32)
    got = gguf_quants.dequantize(raw, qtype)
    per_row = raw.shape[1] // gguf_quants._LAYOUTS[qtype][0] * gguf_quants.BLOCK
    assert got.dtype == np.float32 and got.shape == want.shape == (raw.shape[0], per_row)
    np.testing.assert_array_equal(got, want)


def test_keeps_leading_dimensions():
    rng = np.random.default_rng()
    raw = _random_blocks(rng, "Q8_0", rows=6, blocks_per_row=2).reshape(2, 3, -1)
    assert gguf_quants.dequantize(raw, "Q8_0").shape == (2, 3, 64)
