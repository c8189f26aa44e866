"""GEMM kernels (Triton lowering and Mosaic GPU), interpreted on CPU, vs jnp."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import pytest

from pallas_kernels import gemm, gemm_silu_mul, reference as ref
from pallas_kernels.gemm_config import MgpuConfig
from pallas_kernels.gemm_mgpu import gemm_mgpu
from pallas_kernels.gemm_triton import gemm_triton

from kernel_testing import assert_close, rand

SMALL = dict(block_m=16, block_n=32, block_k=16)  # many tiles from small matrices


@pytest.mark.parametrize("programs", [1, 3, 7, 1000])
@pytest.mark.parametrize("m", [1, 37, 64])
def test_triton_gemm_epilogues(rng, programs, m):
    k, n = 48, 96
    x, w = rand(rng, m, k), rand(rng, k, n)
    b, r = rand(rng, n), rand(rng, m, n)
    kw = dict(num_programs=programs, interpret=True, **SMALL)
    assert_close(gemm_triton(x, w, **kw), ref.gemm(x, w))
    assert_close(gemm_triton(x, w, bias=b, **kw), ref.gemm(x, w, bias=b))
    assert_close(gemm_triton(x, w, bias=b, residual=r, **kw), ref.gemm(x, w, bias=b, residual=r))
    u = rand(rng, k, n)
    assert_close(gemm_triton(x, w, w_up=u, **kw), ref.gemm_silu_mul(x, w, u))


@pytest.mark.parametrize("programs", [2, 5])
def test_triton_silu_mul_bf16(rng, programs):
    x, wg, wu = rand(rng, 40, 64, dtype=jnp.bfloat16), rand(rng, 64, 80, dtype=jnp.bfloat16), \
        rand(rng, 64, 80, dtype=jnp.bfloat16)
    out = gemm_silu_mul(x, wg, wu, num_programs=programs, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref.gemm_silu_mul(x, wg, wu))


def test_triton_gemm_odd_n_and_k(rng):
    """N and K with no power-of-two block >= 16 are padded, then cut back."""
    x, w, r = rand(rng, 9, 20), rand(rng, 20, 30), rand(rng, 9, 30)
    assert_close(gemm(x, w, residual=r, num_programs=2, interpret=True), ref.gemm(x, w, residual=r))


def test_rejects_zero_programs(rng):
    with pytest.raises(ValueError):
        gemm(rand(rng, 16, 16), rand(rng, 16, 16), num_programs=0, interpret=True)


# Mosaic GPU: the CPU interpreter simulates warpgroups, TMA and barriers, so it is
# slow; tiles are the smallest wgmma allows and cases are few.
MCFG = MgpuConfig(tile_m=64, tile_n=32, tile_k=64, stages=2, epi_m=32, epi_n=32)


@pytest.mark.parametrize("programs", [1, 3])
def test_mosaic_gemm(rng, programs):
    x, w = rand(rng, 80, 128, dtype=jnp.bfloat16), rand(rng, 128, 128, dtype=jnp.bfloat16)
    out = gemm_mgpu(x, w, num_programs=programs, interpret=True, config=MCFG)
    assert_close(out, ref.gemm(x, w))


def test_mosaic_gemm_bias_residual_more_programs_than_tiles(rng):
    x, w = rand(rng, 64, 64, dtype=jnp.bfloat16), rand(rng, 64, 128, dtype=jnp.bfloat16)
    b, r = rand(rng, 128, dtype=jnp.bfloat16), rand(rng, 64, 128, dtype=jnp.bfloat16)
    out = gemm_mgpu(x, w, bias=b, residual=r, num_programs=64, interpret=True, config=MCFG)
    assert_close(out, ref.gemm(x, w, bias=b, residual=r))


def test_mosaic_silu_mul_through_dispatch(rng):
    x = rand(rng, 64, 128, dtype=jnp.bfloat16)
    wg, wu = rand(rng, 128, 64, dtype=jnp.bfloat16, scale=0.2), rand(rng, 128, 64, dtype=jnp.bfloat16)
    out = gemm_mgpu(x, wg, w_up=wu, num_programs=1, interpret=True, config=MCFG)
    assert_close(out, ref.gemm_silu_mul(x, wg, wu))


@pytest.mark.parametrize("cfg", [
    # warpgroups split along M, released one step late, tiles walked in groups of 2 M-tiles
    MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, epi_m=32, epi_n=32, wg_split="m",
               delay_release=1, group_m=2),
    # four residual sub-tiles through one staging slot, and through all four
    MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=3, epi_m=32, epi_n=32, out_slots=1),
    MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, epi_m=32, epi_n=32, out_slots=4,
               delay_release=1, group_m=1),
], ids=["split_m_delay_group", "one_slot", "four_slots"])
def test_mosaic_gemm_configs_residual(rng, cfg):
    """Every launch variant the tuner may pick, with the prefetched residual, over
    several tiles per program (3 programs, 9+ tiles) and a ragged M."""
    x, w = rand(rng, 200, 128, dtype=jnp.bfloat16), rand(rng, 128, 384, dtype=jnp.bfloat16)
    r = rand(rng, 200, 384, dtype=jnp.bfloat16)
    out = gemm_mgpu(x, w, residual=r, num_programs=3, interpret=True, config=cfg)
    assert_close(out, ref.gemm(x, w, residual=r))


def test_mosaic_silu_split_m_delayed(rng):
    cfg = MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, epi_m=32, epi_n=32, wg_split="m",
                     delay_release=1)
    x = rand(rng, 128, 128, dtype=jnp.bfloat16)
    wg, wu = rand(rng, 128, 64, dtype=jnp.bfloat16, scale=0.2), rand(rng, 128, 64, dtype=jnp.bfloat16)
    assert_close(gemm_mgpu(x, wg, w_up=wu, num_programs=2, interpret=True, config=cfg),
                 ref.gemm_silu_mul(x, wg, wu))


@pytest.mark.parametrize("cfg,silu", [
    (MgpuConfig(tile_m=64, tile_n=96, epi_n=96, stages=3, wg_split="m", delay_release=1), False),
    (MgpuConfig(tile_m=64, tile_n=96, epi_n=32, stages=2), False),
    (MgpuConfig(tile_m=64, tile_n=112, epi_n=112, stages=2, wg_split="m", chain_tiles=True), True),
], ids=["96_split_m", "96_split_n_3_subtiles", "112_silu_chained"])
def test_mosaic_narrow_weight_tiles(rng, cfg, silu):
    """96/112-column weight tiles (64/32-byte swizzle): N padded up to the tile, a ragged
    M, more tiles than programs."""
    x = rand(rng, 150, 192, dtype=jnp.bfloat16)
    w, u = (rand(rng, 192, 400, dtype=jnp.bfloat16, scale=0.2) for _ in range(2))
    out = gemm_mgpu(x, w, w_up=u if silu else None, num_programs=3, interpret=True, config=cfg)
    assert_close(out, ref.gemm_silu_mul(x, w, u) if silu else ref.gemm(x, w))


def test_tail_tiles_split_only_a_partial_last_wave_that_fits():
    from pallas_kernels.gemm_mgpu import tail_tiles

    assert tail_tiles(4, 112, 132) == 13  # gate/up at M = 512: 396 tiles + 13 columns as 104 halves
    assert tail_tiles(2, 5, 4) == 1       # 8 tiles + one column of 2, as 4 halves
    assert tail_tiles(4, 33, 132) == 0    # exactly one wave
    assert tail_tiles(2, 48, 132) == 0    # under one wave: nothing to balance
    assert tail_tiles(8, 112, 132) == 0   # 104 left over: 208 halves exceed a wave


@pytest.mark.parametrize("kind", ["silu_chained", "residual_split_n", "bias_pairs"])
def test_mosaic_split_tail(rng, kind):
    """The last wave's columns in half-width tiles: 2 ragged CTA rows x 5 CTA columns on 4
    programs -> 8 tiles + 4 half tiles. (Interpreted, each pass is its own launch: jax
    0.10's interpreter deadlocks on two warp-specialized pipelines in one kernel; on the GPU
    tests/test_gpu.py runs them in one.)"""
    small = dict(tile_m=32, tile_n=64, tile_k=32, epi_m=32, epi_n=32, stages=2, split_tail=True)
    cfg = MgpuConfig(**small, **{"silu_chained": dict(wg_split="m", chain_tiles=True),
                                 "residual_split_n": dict(delay_release=1, out_slots=1),
                                 "bias_pairs": dict(wg_split="m", cluster_m=2)}[kind])
    m, n = 2 * cfg.cta_m - 6, 5 * cfg.cta_n
    x = rand(rng, m, 64, dtype=jnp.bfloat16)
    w, u = (rand(rng, 64, n, dtype=jnp.bfloat16, scale=0.2) for _ in range(2))
    run = functools.partial(gemm_mgpu, num_programs=4, interpret=True, config=cfg)
    if kind == "silu_chained":
        out, want = run(x, w, w_up=u), ref.gemm_silu_mul(x, w, u)
    elif kind == "residual_split_n":
        r = rand(rng, m, n, dtype=jnp.bfloat16)
        out, want = run(x, w, residual=r), ref.gemm(x, w, residual=r)
    else:
        b = rand(rng, n, dtype=jnp.bfloat16)
        out, want = run(x, w, bias=b), ref.gemm(x, w, bias=b)
    assert_close(out, want)


def test_split_tail_needs_a_halvable_tile():
    with pytest.raises(ValueError, match="split_tail"):
        MgpuConfig(tile_n=48, epi_n=48, split_tail=True)


def test_config_rejects_tiles_the_gpu_cannot_run():
    with pytest.raises(ValueError, match="tile_n"):
        MgpuConfig(tile_n=100, epi_n=100)
    with pytest.raises(ValueError, match="epi_n"):
        MgpuConfig(tile_n=96)  # the 64-wide default epilogue does not divide 96


def test_tile_coords_visit_every_tile_once():
    from pallas_kernels.gemm_mgpu import tile_coords

    for m_tiles, n_tiles, group in [(5, 3, 2), (4, 4, 0), (7, 2, 3), (3, 5, 1), (2, 2, 8)]:
        seen = {tuple(int(v) for v in tile_coords(jnp.int32(t), m_tiles, n_tiles, group))
                for t in range(m_tiles * n_tiles)}
        assert seen == {(i, j) for i in range(m_tiles) for j in range(n_tiles)}


@pytest.mark.parametrize("silu,has_res", [(False, False), (False, True), (True, False)])
def test_choose_config_is_launchable_on_a_gpu(silu, has_res):
    """Rules the CPU interpreter does not enforce but a GPU does: whole wgmma and
    swizzle tiles, and a pipeline that fits in shared memory."""
    from pallas_kernels.gemm_config import SMEM_BYTES, choose_config

    for m in (1, 16, 128, 256, 512, 1024, 2048):
        for n in (192, 576, 1536, 4096, 6144, 14336):  # SmolLM2-135M and Llama-3-8B widths
            for programs in (1, 33, 132):
                cfg = choose_config(m, n, silu, has_res, programs)
                assert cfg.tile_n % 16 == 0 and cfg.tile_m % 64 == 0, cfg
                assert cfg.tile_n % cfg.epi_n == 0 and cfg.tile_m % cfg.epi_m == 0, cfg
                assert cfg.smem_bytes(silu) <= SMEM_BYTES, cfg


@pytest.mark.parametrize("splits", [2, 3])
def test_mosaic_split_k_with_bias_and_residual(rng, splits):
    """Split K: partial sums of K/splits each (K padded to whole splits), summed in f32
    with the bias and residual; more programs than work units and fewer."""
    cfg = MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, epi_m=32, epi_n=32, k_splits=splits)
    x, w = rand(rng, 70, 320, dtype=jnp.bfloat16), rand(rng, 320, 128, dtype=jnp.bfloat16)
    b, r = rand(rng, 128, dtype=jnp.bfloat16), rand(rng, 70, 128, dtype=jnp.bfloat16)
    for programs in (2, 64):
        out = gemm_mgpu(x, w, bias=b, residual=r, num_programs=programs, interpret=True, config=cfg)
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref.gemm(x, w, bias=b, residual=r))


def test_mosaic_split_k_refuses_silu(rng):
    cfg = MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, k_splits=2)
    x, w = rand(rng, 64, 128, dtype=jnp.bfloat16), rand(rng, 128, 128, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="k_splits"):
        gemm_mgpu(x, w, w_up=w, interpret=True, config=cfg)


@pytest.mark.parametrize("silu", [False, True])
def test_mosaic_chained_tiles(rng, silu):
    """One TMA pipeline across each CTA's tiles (K = 4 steps, 2 stages): 5 M-tiles x
    2 N-tiles over 3 programs gives CTAs 4 and 3 tiles; 7 programs leaves some with one
    tile (unchained) and some with two (start + stop); and a residual epilogue between."""
    cfg = MgpuConfig(tile_m=64, tile_n=64, tile_k=32, stages=2, epi_m=32, epi_n=32, chain_tiles=True)
    _check_silu_or_residual(rng, cfg, 300, silu, (3, 7))


def _check_silu_or_residual(rng, cfg: MgpuConfig, m: int, silu: bool, budgets) -> None:
    """x [m, 128] @ w [128, 256]: silu(x@w) * (x@w2), or + a residual, at each budget."""
    x = rand(rng, m, 128, dtype=jnp.bfloat16)
    w, w2 = rand(rng, 128, 256, dtype=jnp.bfloat16, scale=0.2), rand(rng, 128, 256, dtype=jnp.bfloat16)
    r = rand(rng, m, 256, dtype=jnp.bfloat16)
    for programs in budgets:
        if silu:
            out, want = (gemm_mgpu(x, w, w_up=w2, num_programs=programs, interpret=True, config=cfg),
                         ref.gemm_silu_mul(x, w, w2))
        else:
            out, want = (gemm_mgpu(x, w, residual=r, num_programs=programs, interpret=True, config=cfg),
                         ref.gemm(x, w, residual=r))
        assert_close(out, want)


def test_chained_tiles_refuse_delayed_release():
    with pytest.raises(ValueError, match="delay_release"):
        MgpuConfig(chain_tiles=True, delay_release=1)


def test_split_k_only_where_tiles_leave_sms_idle():
    from pallas_kernels.gemm_config import choose_config

    few = choose_config(128, 4096, silu=False, has_res=True, programs=132)    # 32 tiles
    many = choose_config(128, 65536, silu=False, has_res=True, programs=132)  # 512 tiles
    assert few.k_splits > 1 and many.k_splits == 1
    assert choose_config(128, 4096, silu=False, has_res=True, programs=16).k_splits == 1


def test_deep_residual_gemms_take_their_own_row(tmp_path, monkeypatch):
    """Down + residual (K = 3.5 N) at M = 256 runs split K on 128 x 128 CTAs, O + residual
    (K = N) the fused 128 x 64 CTAs; elsewhere both share the residual rows. A table from
    before the deep kind gives the deep GEMMs its residual rows."""
    import json

    from pallas_kernels.gemm_config import TABLE_ENV, choose_config, load_table, tuned_table

    down = choose_config(256, 4096, False, True, 132, k=14336)
    o = choose_config(256, 4096, False, True, 132, k=4096)
    assert (down.cta_m, down.cta_n, down.k_splits) == (128, 128, 2)
    assert (o.cta_m, o.cta_n, o.k_splits) == (128, 64, 1)
    assert choose_config(256, 4096, False, True, 132) == o  # K unknown: the residual row
    for m in (128, 512, 2048):
        assert choose_config(m, 4096, False, True, 132, k=14336) == choose_config(m, 4096, False, True, 132, k=4096)
    old = MgpuConfig(tile_m=64, tile_n=64, stages=4)
    path = tmp_path / "old_table.json"
    path.write_text(json.dumps({"configs": {"residual": [[128, dataclasses.asdict(old)],
                                                         [256, dataclasses.asdict(old)]]}}))
    load_table.cache_clear()
    monkeypatch.setenv(TABLE_ENV, str(path))
    assert choose_config(256, 4096, False, True, 132, k=14336) == old
    assert "residual_deep" in tuned_table()


def test_gemm_table_from_the_environment_overrides_the_shipped_one(tmp_path, monkeypatch):
    """$NANOFLOW_GEMM_TABLE (a `bench.gemm_tune --table-out` file) wins for the M it
    covers; beyond its largest M the shipped table applies; a bad file is named."""
    import json

    from pallas_kernels.gemm_config import TABLE_ENV, choose_config, load_table

    small, mine = MgpuConfig(tile_m=64, tile_n=64), MgpuConfig(tile_m=128, tile_n=64, stages=3, group_m=4)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"configs": {"plain": [[256, dataclasses.asdict(small)],
                                                      [512, dataclasses.asdict(mine)]]}}))
    shipped = {m: choose_config(m, 4096, False, False, 132) for m in (128, 1024)}
    monkeypatch.setenv(TABLE_ENV, str(path))
    assert choose_config(256, 4096, False, False, 132) == small
    assert choose_config(300, 4096, False, False, 132) == mine
    for m, cfg in shipped.items():  # outside the table's searched range: shipped rows
        assert choose_config(m, 4096, False, False, 132) == cfg
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    load_table.cache_clear()
    monkeypatch.setenv(TABLE_ENV, str(bad))
    with pytest.raises(ValueError, match="bench.gemm_tune"):
        choose_config(300, 4096, False, False, 132)


def test_mosaic_gemm_pipeline_deeper_than_k(rng):
    """More pipeline stages than K steps (6 stages, one 64-deep step per split, operands
    released late) still computes the product."""
    cfg = MgpuConfig(tile_m=64, tile_n=64, tile_k=64, stages=6, epi_m=32, epi_n=32, k_splits=2, delay_release=1)
    x, w = rand(rng, 64, 128, dtype=jnp.bfloat16), rand(rng, 128, 128, dtype=jnp.bfloat16)
    assert_close(gemm_mgpu(x, w, num_programs=3, interpret=True, config=cfg), ref.gemm(x, w))
    # One K step, several tiles per CTA: the pipeline shrinks to one stage, released at once.
    x, w = rand(rng, 256, 64, dtype=jnp.bfloat16), rand(rng, 64, 256, dtype=jnp.bfloat16)
    cfg = dataclasses.replace(cfg, k_splits=1, wg_split="m")
    assert_close(gemm_mgpu(x, w, num_programs=2, interpret=True, config=cfg), ref.gemm(x, w))


@pytest.mark.parametrize("axis", ["m", "n"])
@pytest.mark.parametrize("kind", ["residual", "silu", "chained_split_m", "split_k"])
def test_mosaic_cta_pairs(rng, kind, axis):
    """cluster_m=2 / cluster_n=2: CTA pairs on neighbouring M tiles (one weight tile per
    pair) or N tiles (one activation tile per pair). 4 M-tiles x 4 N-tiles; budgets 1
    (pairs off), 3 (one pair, the odd SM idle) and 5 (two pairs); then 3 M-tiles (odd:
    pairs along M off, no padding)."""
    base = dict(tile_m=32, tile_n=32, tile_k=32, stages=2, epi_m=32, epi_n=32, **{f"cluster_{axis}": 2})
    cfg = MgpuConfig(**base, **{"chained_split_m": dict(wg_split="m", chain_tiles=True),
                                "split_k": dict(k_splits=2)}.get(kind, {}))
    for m in (256, 96) if kind == "residual" else (256,):
        _check_silu_or_residual(rng, cfg, m, kind == "silu", (1, 3, 5))


def test_cta_pairs_along_n_with_an_odd_number_of_n_tiles_run_alone(rng):
    """3 N tiles: a pair along N would overrun the columns, so the CTAs run alone."""
    cfg = MgpuConfig(tile_m=32, tile_n=32, tile_k=32, stages=2, epi_m=32, epi_n=32, cluster_n=2)
    x, w = rand(rng, 64, 64, dtype=jnp.bfloat16), rand(rng, 64, 192, dtype=jnp.bfloat16)
    assert_close(gemm_mgpu(x, w, num_programs=4, interpret=True, config=cfg), ref.gemm(x, w))


def test_cluster_sizes_are_one_or_two_along_one_axis():
    with pytest.raises(ValueError, match="cluster_m"):
        MgpuConfig(cluster_m=4)
    with pytest.raises(ValueError, match="cluster_n"):
        MgpuConfig(cluster_n=3)
    with pytest.raises(ValueError, match="not both"):
        MgpuConfig(cluster_m=2, cluster_n=2)
    with pytest.raises(ValueError, match="split_tail"):
        MgpuConfig(cluster_n=2, split_tail=True)


# The shipped H200 table (pallas_kernels/tuned/gemm_h200.json): per kind, (M bound, the
# fields that differ from MgpuConfig's defaults), by increasing M.
_DR = dict(delay_release=1, wg_split="m")
H200_ROWS = {
    "plain": ((128, dict(tile_m=64, tile_n=64, stages=8, **_DR)), (256, dict(tile_m=64, stages=6, **_DR)),
              (512, dict(tile_m=64, tile_n=192, cluster_m=2, **_DR)),
              (float("inf"), dict(tile_m=64, stages=6, group_m=8, **_DR))),
    "silu": ((128, dict(tile_n=64, delay_release=1)), (256, dict(tile_m=64, **_DR)),
             (512, dict(tile_m=64, wg_split="m", chain_tiles=True, split_tail=True)),
             (float("inf"), dict(tile_m=64, **_DR))),
    "residual": ((128, dict(tile_m=64, tile_n=64, stages=6, k_splits=2, **_DR)),
                 (256, dict(tile_m=64, tile_n=64, stages=8, **_DR)), (512, dict(tile_m=64, stages=6, **_DR)),
                 (float("inf"), dict(chain_tiles=True))),
    "residual_deep": ((128, dict(tile_m=64, tile_n=64, stages=6, k_splits=2, **_DR)),
                      (256, dict(tile_m=64, stages=5, k_splits=2, **_DR)), (512, dict(tile_m=64, stages=6, **_DR)),
                      (float("inf"), dict(chain_tiles=True))),
}


def test_the_shipped_h200_table_holds_the_expected_configs():
    """Bit for bit: every kind, bound and field of the H200 table; CPU runs choose from it."""
    from pallas_kernels.gemm_config import REFERENCE_DEVICE, current_device, shipped_tables, tuned_table

    assert REFERENCE_DEVICE == "NVIDIA H200" and current_device() == REFERENCE_DEVICE
    assert shipped_tables()[REFERENCE_DEVICE].endswith("tuned/gemm_h200.json")
    got = tuned_table()
    assert set(got) == set(H200_ROWS)
    for kind, rows in H200_ROWS.items():
        assert got[kind] == tuple((bound, MgpuConfig(**fields)) for bound, fields in rows), kind


def test_a_table_round_trips_through_the_tuner_format(tmp_path, monkeypatch):
    """The shipped table written as `bench.gemm_tune --table-out` writes one (full fields,
    an infinite last bound) loads back equal, and as $NANOFLOW_GEMM_TABLE chooses alike."""
    import json

    from pallas_kernels.gemm_config import TABLE_ENV, choose_config, load_table, tuned_table

    table = tuned_table()
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"configs": {kind: [[b, dataclasses.asdict(c)] for b, c in rows]
                                            for kind, rows in table.items()}}))
    assert load_table(str(path)) == table
    shapes = [(4096, 6144, False, False), (4096, 4096, False, True), (14336, 4096, False, True),
              (4096, 14336, True, False)]
    want = {(m, s): choose_config(m, s[1], s[2], s[3], 132, k=s[0]) for m in (128, 256, 512, 2048) for s in shapes}
    monkeypatch.setenv(TABLE_ENV, str(path))
    assert {(m, s): choose_config(m, s[1], s[2], s[3], 132, k=s[0]) for m, s in want} == want


def test_a_device_without_a_table_gets_the_wave_model_and_one_warning(monkeypatch, caplog):
    from pallas_kernels import gemm_config

    monkeypatch.setattr(gemm_config, "current_device", lambda: "NVIDIA H100 PCIe")
    gemm_config._warn_untuned.cache_clear()
    with caplog.at_level("WARNING", logger=gemm_config.__name__):
        first = gemm_config.choose_config(1024, 4096, False, False, 132)
        gemm_config.choose_config(256, 14336, True, False, 132)
    assert first == MgpuConfig(tile_m=128, tile_n=128, stages=4)  # one wave of 128 x 256 CTAs
    warnings = [r for r in caplog.records if "no tuned GEMM table" in r.getMessage()]
    assert len(warnings) == 1 and "NVIDIA H100 PCIe" in warnings[0].getMessage()
    gemm_config._warn_untuned.cache_clear()


def test_the_h100_table_serves_decode_sized_batches_only(monkeypatch):
    """The H100's shipped rows cover M <= 256 and larger batches keep the wave model's tiles;
    down + residual (K = 14,336) at M <= 256 takes its own row."""
    from pallas_kernels import gemm_config

    monkeypatch.setattr(gemm_config, "current_device", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("NANOFLOW_GEMM_TABLE", raising=False)
    table = gemm_config.tuned_table()
    assert table is not None and all(bound == 256 for rows in table.values() for bound, _ in rows)
    o_res = gemm_config.choose_config(256, 4096, False, True, 132, k=4096)
    assert o_res == table["residual"][0][1]
    down = gemm_config.choose_config(128, 4096, False, True, 132, k=14336)
    assert down == table["residual_deep"][0][1] != o_res
    monkeypatch.setattr(gemm_config, "current_device", lambda: "NVIDIA H100 PCIe")   # no table
    gemm_config._warn_untuned.cache_clear()
    for m, n, silu, res, k in ((2048, 4096, False, True, 14336), (2048, 4096, False, True, 4096),
                               (1024, 6144, False, False, 4096)):
        wave = gemm_config.choose_config(m, n, silu, res, 132, k=k)
        monkeypatch.setattr(gemm_config, "current_device", lambda: "NVIDIA H100 80GB HBM3")
        assert gemm_config.choose_config(m, n, silu, res, 132, k=k) == wave
        monkeypatch.setattr(gemm_config, "current_device", lambda: "NVIDIA H100 PCIe")
    gemm_config._warn_untuned.cache_clear()


@pytest.mark.parametrize("layer", [0, 2])
def test_mosaic_gemm_reads_one_layer_of_stacked_weights(rng, layer):
    """With `layer`, the kernel reads that layer of [L, K, N] weights in place (the
    nanoflow step's GEMMs); every epilogue, and a padded N, against the sliced weight."""
    x = rand(rng, 64, 64, dtype=jnp.bfloat16)
    w, u = rand(rng, 3, 64, 96, dtype=jnp.bfloat16, scale=0.2), rand(rng, 3, 64, 96, dtype=jnp.bfloat16)
    r = rand(rng, 64, 96, dtype=jnp.bfloat16)
    idx = jnp.int32(layer)
    assert_close(gemm_mgpu(x, w, residual=r, layer=idx, num_programs=2, interpret=True, config=MCFG),
                 ref.gemm(x, w[layer], residual=r))
    assert_close(gemm_mgpu(x, w, w_up=u, layer=idx, num_programs=2, interpret=True, config=MCFG),
                 ref.gemm_silu_mul(x, w[layer], u[layer]))


def test_stacked_weights_through_dispatch_on_the_triton_lowering(rng):
    x, w = rand(rng, 16, 32), rand(rng, 4, 32, 48)
    assert_close(gemm(x, w, layer=jnp.int32(3), num_programs=2, interpret=True), ref.gemm(x, w[3]))
    assert_close(gemm_silu_mul(x, w, w, layer=1, num_programs=2, interpret=True), ref.gemm_silu_mul(x, w[1], w[1]))
