"""KV-page movement: writing new K/V into their slots, and page gather/scatter.

All three update or read the cache in its fixed layout ([L, P, ps, K, D]; page 0
is the null page). write_kv and scatter_pages alias the cache to their output
(input_output_aliases), so with a donated cache XLA updates it in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import pad_axis, persistent_loop, pick_block, resolve_programs, triton_params
from pallas_kernels.norm_rope import rope_cos_sin, rotate_half
from pallas_kernels.reference import rope_inv_freq

_CHUNKS = (8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


FP8_E4M3_MAX = 448.0


def to_cache_dtype(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x as the cache stores it. An fp8 (e4m3) cache saturates at +-448, unscaled (vLLM's fp8
    KV cache by default): a plain cast past that range gives NaN, the format having no infinity."""
    if jnp.dtype(dtype) == jnp.float8_e4m3fn:
        x = jnp.clip(x.astype(jnp.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.astype(dtype)


def _write_kv_kernel(kn_ref, vn_ref, slot_ref, row0_ref, *refs, bt: int, num_tokens: int,
                     num_kv: int, rope: bool) -> None:
    pos_ref, f_ref = refs[:2] if rope else (None, None)
    ko_ref, vo_ref = refs[-2:]  # aliased to the two cache inputs before them
    d = ko_ref.shape[2]

    def item(w):
        tb, kh = w // num_kv, w % num_kv
        tok = tb * bt + jnp.arange(bt, dtype=jnp.int32)
        valid = (tok < num_tokens)[:, None]
        rows = (slot_ref[pl.ds(tb * bt, bt)] + row0_ref[0])[:, None]
        # All-array indices (a scatter): the interpreter cannot mix them with slices.
        cols = jnp.arange(d, dtype=jnp.int32)[None, :]
        src = pl.ds(tb * bt, bt)
        if rope:  # rotate-half RoPE of K on its way into the cache (one pass, no rope kernel)
            half = d // 2
            cos, sin = rope_cos_sin(pos_ref[src], f_ref[...])
            y1, y2 = rotate_half(kn_ref[src, kh, pl.ds(0, half)], kn_ref[src, kh, pl.ds(half, half)], cos, sin)
            lo = jnp.arange(half, dtype=jnp.int32)[None, :]
            pltriton.store(ko_ref.at[rows, kh, lo], to_cache_dtype(y1, ko_ref.dtype), mask=valid)
            pltriton.store(ko_ref.at[rows, kh, lo + half], to_cache_dtype(y2, ko_ref.dtype), mask=valid)
        else:
            pltriton.store(ko_ref.at[rows, kh, cols], to_cache_dtype(kn_ref[src, kh, :], ko_ref.dtype), mask=valid)
        pltriton.store(vo_ref.at[rows, kh, cols], to_cache_dtype(vn_ref[src, kh, :], vo_ref.dtype), mask=valid)

    persistent_loop((kn_ref.shape[0] // bt) * num_kv, item)


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k_new: jax.Array, v_new: jax.Array,
             slot_mapping: jax.Array, *, layer: jax.Array | int | None = None,
             rope_positions: jax.Array | None = None, rope_theta: float = 10000.0,
             rope_scaling: dict | None = None, num_programs: int | None = None,
             interpret: bool = False, block_tokens: int = 16) -> tuple[jax.Array, jax.Array]:
    """Writes k_new/v_new [T, K, D] to flat slots (page * page_size + offset) -> (k, v).

    k_pages/v_pages: one layer [P, ps, K, D], or the whole cache [L, P, ps, K, D] with
    `layer` naming the layer written (may be traced, e.g. inside a scan over layers).
    With rope_positions [T], K is written rotated (RoPE as `apply_rope` with rope_theta
    and rope_scaling): the rope kernel for K and its pass over memory are saved.
    Updated in place through input_output_aliases (donate the cache to avoid a copy).
    An fp8 (e4m3) cache stores the values saturated at +-448, unscaled.
    """
    shape = k_pages.shape
    if k_pages.ndim == 5:
        if layer is None:
            raise ValueError("write_kv on a [L, P, ps, K, D] cache needs `layer`")
        row0 = jnp.asarray(layer, jnp.int32) * (shape[1] * shape[2])
    else:
        row0 = jnp.int32(0)
    num_kv, d = shape[-2], shape[-1]
    flat = lambda a: a.reshape(-1, num_kv, d)
    t = k_new.shape[0]
    bt = min(block_tokens, 1 << (t - 1).bit_length()) if t > 0 else 1
    kn, vn = pad_axis(k_new, 0, bt), pad_axis(v_new, 0, bt)
    slots = pad_axis(slot_mapping.astype(jnp.int32), 0, bt)
    progs = resolve_programs(num_programs, (kn.shape[0] // bt) * num_kv)
    rope = rope_positions is not None
    extra = (pad_axis(rope_positions.astype(jnp.int32), 0, bt), rope_inv_freq(d, rope_theta, rope_scaling)) \
        if rope else ()
    kf, vf = flat(k_pages), flat(v_pages)
    n_in = 4 + len(extra)
    ko, vo = pl.pallas_call(
        functools.partial(_write_kv_kernel, bt=bt, num_tokens=t, num_kv=num_kv, rope=rope),
        out_shape=(jax.ShapeDtypeStruct(kf.shape, kf.dtype), jax.ShapeDtypeStruct(vf.shape, vf.dtype)),
        grid=(progs,),
        input_output_aliases={n_in: 0, n_in + 1: 1},
        compiler_params=triton_params(4, 1),
        interpret=interpret,
        name="write_kv_rope" if rope else "write_kv",
    )(kn, vn, slots, row0.reshape(1), *extra, kf, vf)
    return ko.reshape(shape), vo.reshape(shape)


def _pages_kernel(ids_ref, src_ref, *refs, cw: int, chunks: int, n: int, gather: bool) -> None:
    dst_ref = refs[-1]  # scatter: refs = (pages_in, pages_out), aliased

    def item(w):
        layer, rest = w // (n * chunks), w % (n * chunks)
        i, c = rest // chunks, rest % chunks
        cols = pl.ds(c * cw, cw)
        page = ids_ref[i]
        if gather:
            dst_ref[layer, i, cols] = src_ref[layer, page, cols]
        else:
            dst_ref[layer, page, cols] = src_ref[layer, i, cols].astype(dst_ref.dtype)

    persistent_loop(src_ref.shape[0] * n * chunks, item)


def _page_call(pages: jax.Array, page_ids: jax.Array, buf: jax.Array | None,
               num_programs: int | None, interpret: bool) -> jax.Array:
    l, p = pages.shape[:2]
    row = pages[0, 0].size
    n = page_ids.shape[0]
    cw = pick_block(row, _CHUNKS)
    chunks = row // cw
    progs = resolve_programs(num_programs, l * n * chunks)
    gather = buf is None
    flat = pages.reshape(l, p, row)
    kernel = functools.partial(_pages_kernel, cw=cw, chunks=chunks, n=n, gather=gather)
    out_rows = n if gather else p
    args = (page_ids.astype(jnp.int32), flat) if gather else \
        (page_ids.astype(jnp.int32), buf.reshape(l, n, row), flat)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((l, out_rows, row), pages.dtype),
        grid=(progs,),
        input_output_aliases={} if gather else {2: 0},
        compiler_params=triton_params(8, 1),
        interpret=interpret,
        name="gather_pages" if gather else "scatter_pages",
    )(*args)
    return out.reshape(l, out_rows, *pages.shape[2:])


def gather_pages(pages: jax.Array, page_ids: jax.Array, *, num_programs: int | None = None,
                 interpret: bool = False) -> jax.Array:
    """pages [L, P, ps, K, D], page_ids [n] -> [L, n, ps, K, D] contiguous (for KV offload)."""
    return _page_call(pages, page_ids, None, num_programs, interpret)


def scatter_pages(pages: jax.Array, page_ids: jax.Array, buf: jax.Array, *,
                  num_programs: int | None = None, interpret: bool = False) -> jax.Array:
    """Writes buf [L, n, ps, K, D] into pages at page_ids -> pages (aliased, in place)."""
    return _page_call(pages, page_ids, buf, num_programs, interpret)
