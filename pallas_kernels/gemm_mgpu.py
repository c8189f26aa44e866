"""Persistent Hopper GEMM in Mosaic GPU (wgmma + TMA + warp specialization).

Launch: `num_programs` CTAs, each with one TMA producer warpgroup and two compute
warpgroups that split the CTA tile along N. A CTA loops over output tiles
pid, pid + P, ... (plgpu.nd_loop), so the SM budget is exactly `num_programs`.
Epilogues run on the accumulator registers: bias (a row vector broadcast over M),
residual (TMA-loaded tile), or silu(gate) * up (two accumulators per warpgroup).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels._common import mosaic_interpret_params, num_sms, pad_axis, resolve_programs

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    tile_m: int = 128   # rows per warpgroup (and per CTA)
    tile_n: int = 128   # columns per warpgroup; the CTA tile is 2 * tile_n wide
    tile_k: int = 64
    stages: int = 4     # TMA pipeline depth (shared memory bound: 4 fits 128x256x64)
    epi_m: int = 64     # epilogue sub-tile (bounds the output staging buffer)
    epi_n: int = 64


# (tile_m, tile_n per warpgroup, relative efficiency of the tile): bigger tiles reuse
# operands better; smaller ones fill more SMs when M or N is small.
_PLAIN_TILES = ((128, 128, 1.0), (128, 64, 0.88), (64, 64, 0.75))
_SILU_TILES = ((128, 64, 1.0), (64, 64, 0.85), (64, 32, 0.7))


def choose_config(m: int, n: int, silu: bool, has_res: bool, programs: int) -> MgpuConfig:
    """The tile that minimises waves x tile cost on `programs` SMs (a simple model)."""
    best, best_cost = None, float("inf")
    for tm, tn, eff in (_SILU_TILES if silu else _PLAIN_TILES):
        if n % (2 * tn) and n >= 2 * tn * 8:
            continue  # would need padding of a large N
        tiles = -(-m // tm) * -(-n // (2 * tn))
        waves = -(-tiles // max(1, min(programs, tiles)))
        cost = waves * tm * 2 * tn / eff
        if cost < best_cost:
            best, best_cost = (tm, tn), cost
    tm, tn = best
    # The residual's staging buffer leaves room for 3 pipeline stages, not 4.
    return MgpuConfig(tile_m=tm, tile_n=tn, epi_m=min(64, tm), epi_n=min(64, tn),
                      stages=3 if has_res else 4)


def _smem_transforms(cols: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _kernel(*refs, cfg: MgpuConfig, m_tiles: int, n_tiles: int, k_iters: int,
            has_bias: bool, has_res: bool, silu_mul: bool, interpret: bool) -> None:
    refs = list(refs)
    x_g, w_g = refs.pop(0), refs.pop(0)
    u_g = refs.pop(0) if silu_mul else None
    b_g = refs.pop(0) if has_bias else None
    r_g = refs.pop(0) if has_res else None
    (o_g,) = refs
    tm, tn, tk, em, en = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.epi_m, cfg.epi_n
    dtype = x_g.dtype
    in_tf = _smem_transforms(tk, dtype)
    out_tf = _smem_transforms(en, o_g.dtype)
    n_epi = tn // en
    m_epi = tm // em
    specs = [plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=in_tf, memory_space=plgpu.SMEM)]
    for _ in range(2 if silu_mul else 1):
        specs.append(plgpu.BlockSpec((tk, 2 * tn), lambda k: (k, 0), transforms=in_tf,
                                     memory_space=plgpu.SMEM))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=context)

    noop = lambda *_, **__: None
    gmem_ins = (x_g, w_g) + ((u_g,) if silu_mul else ())
    scratch = dict(
        allocs=pipeline(noop, noop).get_allocations(*gmem_ins),
        out_smem=plgpu.SMEM((2, 2, em, en), o_g.dtype, transforms=out_tf),
        res_smem=plgpu.SMEM((2, em, en), o_g.dtype, transforms=out_tf) if has_res else None,
        bias_smem=plgpu.SMEM((2, en), b_g.dtype) if has_bias else None,
        bar=plgpu.Barrier(num_barriers=4) if (has_res or has_bias) else None,
    )

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, res_smem, bias_smem, bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="programs")
        def _tile(info):
            (t,) = info.index
            # M fastest: CTAs that run together read the same weight panel.
            m_idx, n_idx = t % m_tiles, t // m_tiles
            m_sl = pl.ds(m_idx * tm, tm)
            n_cta = pl.ds(n_idx * 2 * tn, 2 * tn)
            wg_n0 = n_idx * 2 * tn + wg * tn

            def context(run):
                accs = dict(g=plgpu.ACC((tm, tn), F32))
                if silu_mul:
                    accs["u"] = plgpu.ACC((tm, tn), F32)

                @functools.partial(pl.run_scoped, **accs)
                def _acc(g, u=None):
                    run((g, u) if silu_mul else g)
                    acc = g[...]
                    if silu_mul:
                        acc = acc / (1.0 + jnp.exp(-acc)) * u[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(m_epi * n_epi):
                        em_i, en_i = divmod(e, n_epi)
                        slot = e % 2
                        cols = pl.ds(wg_n0 + en_i * en, en)
                        rows = pl.ds(m_idx * tm + em_i * em, em)
                        part = acc[em_i * em:(em_i + 1) * em, en_i * en:(en_i + 1) * en]
                        if has_bias:
                            plgpu.copy_gmem_to_smem(b_g.at[cols], bias_smem.at[wg], bar.at[2 + wg])
                            plgpu.barrier_wait(bar.at[2 + wg])
                            if interpret:  # the interpreter has no layouts (and no load_p)
                                bvec = bias_smem[wg]
                            else:  # a row vector in the accumulator's column layout
                                bvec = plgpu.load(bias_smem.at[wg], (),
                                                  layout=plgpu.Layout.WGMMA.reduce(0))
                            part = part + lax.broadcast_in_dim(bvec.astype(F32), (em, en), (1,))
                        if has_res:
                            plgpu.copy_gmem_to_smem(r_g.at[rows, cols], res_smem.at[wg], bar.at[wg])
                            plgpu.barrier_wait(bar.at[wg])
                            part = part + res_smem[wg].astype(F32)
                        # Slot reuse: wait until the copy issued two sub-tiles ago has read it.
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = part.astype(o_g.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], o_g.at[rows, cols])

            def mma(_, a_s, *b_s_and_acc):
                *b_s, acc = b_s_and_acc
                wg_cols = pl.ds(wg * tn, tn)
                if silu_mul:
                    plgpu.wgmma(acc[0], a_s, b_s[0].at[:, wg_cols])
                    plgpu.wgmma(acc[1], a_s, b_s[1].at[:, wg_cols])
                else:
                    plgpu.wgmma(acc, a_s, b_s[0].at[:, wg_cols])
                plgpu.wgmma_wait(0)
                return acc

            pipeline(mma, context)(x_g.at[m_sl, :], *(g.at[:, n_cta] for g in gmem_ins[1:]),
                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gemm_mgpu(x: jax.Array, w: jax.Array, *, w_up: jax.Array | None = None,
              bias: jax.Array | None = None, residual: jax.Array | None = None,
              num_programs: int | None = None, interpret: bool = False,
              config: MgpuConfig | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (+bias)(+residual); with w_up: silu(x@w) * (x@w_up). bf16/f16.

    M is padded to tile_m; N must divide by 2 * tile_n and K by tile_k (else pad).
    """
    silu = w_up is not None
    m, k = x.shape
    n = w.shape[1]
    budget = num_programs if num_programs is not None else num_sms()
    cfg = config or choose_config(m, n, silu, residual is not None, budget)
    cta_n = 2 * cfg.tile_n
    xp = pad_axis(pad_axis(x, 0, cfg.tile_m), 1, cfg.tile_k)
    pad_w = lambda a: pad_axis(pad_axis(a, 0, cfg.tile_k), 1, cta_n)
    ins = [xp, pad_w(w)] + ([pad_w(w_up)] if silu else [])
    if bias is not None:
        ins.append(pad_axis(bias, 0, cta_n))
    if residual is not None:
        ins.append(pad_axis(pad_axis(residual.astype(x.dtype), 0, cfg.tile_m), 1, cta_n))
    mp, kp = xp.shape
    np_ = ins[1].shape[1]
    m_tiles, n_tiles = mp // cfg.tile_m, np_ // cta_n
    progs = resolve_programs(num_programs, m_tiles * n_tiles)
    kernel = functools.partial(_kernel, cfg=cfg, m_tiles=m_tiles, n_tiles=n_tiles,
                               k_iters=kp // cfg.tile_k, has_bias=bias is not None,
                               has_res=residual is not None, silu_mul=silu,
                               interpret=interpret)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(progs,), grid_names=("programs",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=mosaic_interpret_params() if interpret else False,
    )
    out = call(*ins)
    return out[:m, :n] if (mp, np_) != (m, n) else out
