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
    """One launch configuration; the two compute warpgroups split the CTA tile along
    `wg_split` ("n": CTA tile tile_m x 2*tile_n; "m": 2*tile_m x tile_n)."""

    tile_m: int = 128   # rows per warpgroup
    tile_n: int = 128   # columns per warpgroup
    tile_k: int = 64
    stages: int = 4     # TMA pipeline depth (shared memory bound: 4 fits 128x256x64)
    epi_m: int = 64     # epilogue sub-tile (bounds the output staging buffer)
    epi_n: int = 64
    wg_split: str = "n"
    delay_release: int = 0  # wgmma groups left in flight across a pipeline step (0 or 1)
    group_m: int = 0    # tile order: CTAs walk groups of group_m M-tiles (0: all M first)
    out_slots: int = 2  # output staging slots per warpgroup (the residual is prefetched into them)
    k_splits: int = 1   # split K: f32 partial products summed (with bias/residual) by XLA after

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" else 1)


# Fallback warpgroup tiles (tile_m, tile_n, relative efficiency): bigger tiles reuse operands
# better; smaller ones fill more SMs when M or N is small. tile_n stays a multiple of
# 64 (the 128-byte swizzle width): a warpgroup's column slice of the B tile must be
# whole swizzle tiles on a GPU (the CPU interpreter does not check this).
_PLAIN_TILES = ((128, 128, 1.0), (128, 64, 0.88), (64, 64, 0.75))
_SILU_TILES = ((128, 64, 1.0), (64, 64, 0.85))


# The H200 search's winners at full grid (bench/results/gemm_tune_h200*.json), per kind
# of GEMM and dense batch M (first row with M <= its bound). vs the previous wave-model
# choice: QKV at M >= 1024 0.49-0.58 -> 0.73-0.81 of the library; the residual GEMMs at
# M <= 512 0.45-0.50 -> 0.53-0.68; gate/up+SiLU 0.77-0.95 -> 0.84-0.98.
_TUNED: dict[str, tuple[tuple[float, MgpuConfig], ...]] = {
    "plain": ((256, MgpuConfig(tile_m=128, tile_n=64, stages=4)),
              (512, MgpuConfig(tile_m=128, tile_n=128, stages=4, delay_release=1)),
              (float("inf"), MgpuConfig(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m"))),
    "silu": ((512, MgpuConfig(tile_m=128, tile_n=64, stages=4, delay_release=1)),
             (float("inf"), MgpuConfig(tile_m=64, tile_n=128, stages=4, delay_release=1, wg_split="m"))),
    "residual": ((512, MgpuConfig(tile_m=128, tile_n=64, stages=6, delay_release=1)),
                 (float("inf"), MgpuConfig(tile_m=128, tile_n=128, stages=3))),
}


def choose_config(m: int, n: int, silu: bool, has_res: bool, programs: int) -> MgpuConfig:
    """The measured configuration for this kind of GEMM when M is in the searched range
    (>= 256) and N divides its CTA width; otherwise (decode-sized M, SmolLM2's 576-wide
    N) the tile that minimises waves x tile cost on `programs` SMs (a simple model), so
    small batches still spread over many SMs."""
    kind = "silu" if silu else "residual" if has_res else "plain"
    tuned = next(cfg for bound, cfg in _TUNED[kind] if m <= bound)
    if m >= 256 and n % tuned.cta_n == 0:
        return tuned
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
    small_res = has_res and m <= 512
    if small_res:  # measured at M = 256/512: 0.45-0.50 -> 0.53-0.64 of the library
        tm, tn = 128, 64
    # Otherwise the residual's staging buffer leaves room for 3 pipeline stages, not 4.
    stages = 6 if small_res else 3 if has_res else 4
    return MgpuConfig(tile_m=tm, tile_n=tn, epi_m=min(64, tm), epi_n=min(64, tn), stages=stages,
                      delay_release=1 if (silu or small_res) else 0)


def _smem_transforms(cols: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def tile_coords(t, m_tiles: int, n_tiles: int, group_m: int):
    """Linear tile index -> (m, n) tile. CTAs that run together share weight panels
    (M fastest) or, with group_m, walk groups of group_m M-tiles (L2 reuse of both)."""
    if group_m <= 0 or group_m >= m_tiles:
        return t % m_tiles, t // m_tiles
    per_group = group_m * n_tiles
    first = (t // per_group) * group_m
    size = jnp.minimum(m_tiles - first, group_m)
    r = t % per_group
    return first + r % size, r // size


def _kernel(*refs, cfg: MgpuConfig, m_tiles: int, n_tiles: int, k_iters: int,
            has_bias: bool, has_res: bool, silu_mul: bool, interpret: bool) -> None:
    refs = list(refs)
    x_g, w_g = refs.pop(0), refs.pop(0)
    u_g = refs.pop(0) if silu_mul else None
    b_g = refs.pop(0) if has_bias else None
    r_g = refs.pop(0) if has_res else None
    (o_g,) = refs
    tm, tn, tk, em, en = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.epi_m, cfg.epi_n
    cm, cn, split_m = cfg.cta_m, cfg.cta_n, cfg.wg_split == "m"
    dtype = x_g.dtype
    in_tf = _smem_transforms(tk, dtype)
    out_tf = _smem_transforms(en, o_g.dtype)
    n_epi, m_epi = tn // en, tm // em
    subs = m_epi * n_epi
    slots = min(cfg.out_slots, subs) if has_res else min(2, subs)
    specs = [plgpu.BlockSpec((cm, tk), lambda k: (0, k), transforms=in_tf, memory_space=plgpu.SMEM,
                             delay_release=cfg.delay_release)]
    for _ in range(2 if silu_mul else 1):
        specs.append(plgpu.BlockSpec((tk, cn), lambda k: (k, 0), transforms=in_tf,
                                     memory_space=plgpu.SMEM, delay_release=cfg.delay_release))
    groups_per_step = 2 if silu_mul else 1

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=context)

    noop = lambda *_, **__: None
    gmem_ins = (x_g, w_g) + ((u_g,) if silu_mul else ())
    scratch = dict(
        allocs=pipeline(noop, noop).get_allocations(*gmem_ins),
        out_smem=plgpu.SMEM((2, slots, em, en), o_g.dtype, transforms=out_tf),
        bias_smem=plgpu.SMEM((2, en), b_g.dtype) if has_bias else None,
        bar=plgpu.Barrier(num_barriers=2 * slots + 2) if (has_res or has_bias) else None,
    )

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, bias_smem, bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles * cfg.k_splits,), collective_axes="programs")
        def _tile(info):
            (t,) = info.index
            k_split, t = t // (m_tiles * n_tiles), t % (m_tiles * n_tiles)
            m_idx, n_idx = tile_coords(t, m_tiles, n_tiles, cfg.group_m)
            # With split K each split writes its own [M, N] block of partial sums.
            wg_m0 = (k_split * m_tiles + m_idx) * cm + (wg * tm if split_m else 0)
            wg_n0 = n_idx * cn + (0 if split_m else wg * tn)

            def sub_slices(e):
                em_i, en_i = divmod(e, n_epi)
                return pl.ds(wg_m0 + em_i * em, em), pl.ds(wg_n0 + en_i * en, en)

            def load_residual(e):
                rows, cols = sub_slices(e)
                plgpu.copy_gmem_to_smem(r_g.at[rows, cols], out_smem.at[wg, e % slots],
                                        bar.at[wg * slots + e % slots])

            def context(run):
                if has_res:
                    # The previous tile's stores must have left the slots; then the first
                    # residual sub-tiles load while the main loop runs.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(slots):
                        load_residual(e)
                accs = dict(g=plgpu.ACC((tm, tn), F32))
                if silu_mul:
                    accs["u"] = plgpu.ACC((tm, tn), F32)

                @functools.partial(pl.run_scoped, **accs)
                def _acc(g, u=None):
                    run((g, u) if silu_mul else g)
                    acc = g[...]
                    if silu_mul:
                        acc = acc / (1.0 + jnp.exp(-acc)) * u[...]
                    if not has_res:
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(subs):
                        em_i, en_i = divmod(e, n_epi)
                        slot = e % slots
                        rows, cols = sub_slices(e)
                        part = acc[em_i * em:(em_i + 1) * em, en_i * en:(en_i + 1) * en]
                        if has_bias:
                            plgpu.copy_gmem_to_smem(b_g.at[cols], bias_smem.at[wg], bar.at[2 * slots + wg])
                            plgpu.barrier_wait(bar.at[2 * slots + wg])
                            if interpret:  # the interpreter has no layouts (and no load_p)
                                bvec = bias_smem[wg]
                            else:  # a row vector in the accumulator's column layout
                                bvec = plgpu.load(bias_smem.at[wg], (),
                                                  layout=plgpu.Layout.WGMMA.reduce(0))
                            part = part + lax.broadcast_in_dim(bvec.astype(F32), (em, en), (1,))
                        if has_res:
                            if e >= slots:  # slot reuse: its store has read it, then refill
                                plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                                load_residual(e)
                            plgpu.barrier_wait(bar.at[wg * slots + slot])
                            part = part + out_smem[wg, slot].astype(F32)
                        else:  # slot reuse: wait until the copy issued `slots` ago has read it
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                        out_smem[wg, slot] = part.astype(o_g.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], o_g.at[rows, cols])

            def mma(_, a_s, *b_s_and_acc):
                *b_s, acc = b_s_and_acc
                a_wg = a_s.at[pl.ds(wg * tm, tm)] if split_m else a_s
                b_wg = [b if split_m else b.at[:, pl.ds(wg * tn, tn)] for b in b_s]
                if silu_mul:
                    plgpu.wgmma(acc[0], a_wg, b_wg[0])
                    plgpu.wgmma(acc[1], a_wg, b_wg[1])
                else:
                    plgpu.wgmma(acc, a_wg, b_wg[0])
                # With delayed release the previous step's slots stay valid while this
                # step's wgmma groups run.
                plgpu.wgmma_wait(cfg.delay_release * groups_per_step)
                return acc

            k_sl = pl.ds(k_split * k_iters * tk, k_iters * tk)
            pipeline(mma, context)(x_g.at[pl.ds(m_idx * cm, cm), k_sl],
                                   *(g.at[k_sl, pl.ds(n_idx * cn, cn)] for g in gmem_ins[1:]),
                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gemm_mgpu(x: jax.Array, w: jax.Array, *, w_up: jax.Array | None = None,
              bias: jax.Array | None = None, residual: jax.Array | None = None,
              num_programs: int | None = None, interpret: bool = False,
              config: MgpuConfig | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (+bias)(+residual); with w_up: silu(x@w) * (x@w_up). bf16/f16.

    M, N and K are padded to the CTA tile and tile_k where they do not divide.
    """
    silu = w_up is not None
    m, k = x.shape
    n = w.shape[1]
    budget = num_programs if num_programs is not None else num_sms()
    cfg = config or choose_config(m, n, silu, residual is not None, budget)
    splits = cfg.k_splits
    if splits > 1 and silu:
        raise ValueError("k_splits > 1 needs the whole sum before SiLU: use it for plain GEMMs")
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    xp = pad_axis(pad_axis(x, 0, cta_m), 1, cfg.tile_k * splits)
    pad_w = lambda a: pad_axis(pad_axis(a, 0, cfg.tile_k * splits), 1, cta_n)
    ins = [xp, pad_w(w)] + ([pad_w(w_up)] if silu else [])
    in_kernel = splits == 1  # split K: bias and residual join the partial sums in XLA
    if bias is not None and in_kernel:
        ins.append(pad_axis(bias, 0, cta_n))
    if residual is not None and in_kernel:
        ins.append(pad_axis(pad_axis(residual.astype(x.dtype), 0, cta_m), 1, cta_n))
    mp, kp = xp.shape
    np_ = ins[1].shape[1]
    m_tiles, n_tiles = mp // cta_m, np_ // cta_n
    progs = resolve_programs(num_programs, m_tiles * n_tiles * splits)
    kernel = functools.partial(_kernel, cfg=cfg, m_tiles=m_tiles, n_tiles=n_tiles,
                               k_iters=kp // (cfg.tile_k * splits),
                               has_bias=bias is not None and in_kernel,
                               has_res=residual is not None and in_kernel, silu_mul=silu,
                               interpret=interpret)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits * mp, np_), x.dtype if in_kernel else F32),
        grid=(progs,), grid_names=("programs",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=mosaic_interpret_params() if interpret else False,
    )
    out = call(*ins)
    if not in_kernel:
        out = out.reshape(splits, mp, np_)[:, :m, :n].sum(axis=0)
        if bias is not None:
            out = out + bias.astype(F32)
        if residual is not None:
            out = out + residual.astype(F32)
        return out.astype(x.dtype)
    return out[:m, :n] if (mp, np_) != (m, n) else out
