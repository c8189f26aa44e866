"""Persistent Hopper GEMM in Mosaic GPU (wgmma + TMA + warp specialization).

Launch: `num_programs` CTAs, each with one TMA producer warpgroup and two compute
warpgroups that split the CTA tile along N or M (`MgpuConfig`, gemm_config.py). A CTA
loops over output tiles (and K splits) pid, pid + P, ... (plgpu.nd_loop), so the SM
budget is exactly `num_programs`. Epilogues run on the accumulator registers: bias (a
row vector broadcast over M), residual (TMA-loaded into the output staging slots while
the main loop runs), or silu(gate) * up (two accumulators per warpgroup).

A pass is built from its TMA specs (`_in_specs`), one K step's wgmma (`_mma_body`), the
per-tile compute context and epilogue (`_compute_context`, `_epilogue`) and the pipeline
call (`_pipeline`, `_run_tile`), over a static plan (`_Pass`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels._common import mosaic_interpret_params, num_sms, pad_axis, resolve_programs
from pallas_kernels.gemm_config import MgpuConfig, choose_config

F32 = jnp.float32


def _smem_transforms(cols: int, dtype, swizzle: int | None = None) -> tuple:
    swizzle = swizzle or plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
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


def tail_tiles(m_tiles: int, n_tiles: int, ctas: int) -> int:
    """N tiles (of m_tiles tiles each) to run as twice as many half-width tiles after the
    others: the last, partial wave's columns, when its half tiles fit in one wave. Then
    a CTA's last tile takes half as long (gate/up at M = 512 on 132 SMs: 448 tiles are
    3 full waves and 52 tiles, i.e. 4 tile times; split, 3.5). 0: no tail split."""
    full, rest = divmod(m_tiles * n_tiles, ctas)
    tail = -(-rest // m_tiles)
    return tail if full and rest and 2 * m_tiles * tail <= ctas and tail < n_tiles else 0


def half_width(cfg: MgpuConfig) -> MgpuConfig:
    """The tail's tile: half the columns, unchained (a CTA runs at most one)."""
    tn = cfg.tile_n // 2
    return dataclasses.replace(cfg, tile_n=tn, epi_n=min(cfg.epi_n, tn), chain_tiles=False,
                               group_m=0, split_tail=False)


def _kernel(*refs, cfg: MgpuConfig, m_tiles: int, n_tiles: int, tail: int,
            passes: tuple[str, ...] = ("main", "tail"), **kw) -> None:
    """Columns [0, (n_tiles - tail) * cta_n) in cfg's tiles, then the rest in half-width
    tiles; each pass has its own shared memory (run_scoped reuses it after a barrier)."""
    main = n_tiles - tail
    if "main" in passes:
        _tile_pass(*refs, cfg=cfg, m_tiles=m_tiles, n_tiles=main, col0=0, **kw)
    if tail and "tail" in passes:
        _tile_pass(*refs, cfg=half_width(cfg), m_tiles=m_tiles, n_tiles=2 * tail,
                   col0=main * cfg.cta_n, **kw)


class _Refs(NamedTuple):
    """The kernel's operands in global memory (u: w_up; b: bias; r: residual; layer: the
    int32 [1] index into stacked weights, which then are [L, K, N])."""

    x: Any
    w: Any
    u: Any
    b: Any
    r: Any
    o: Any
    layer: Any = None

    @classmethod
    def unpack(cls, refs: tuple, silu_mul: bool, has_bias: bool, has_res: bool, stacked: bool = False) -> _Refs:
        rest = list(refs)
        layer = rest.pop(0) if stacked else None
        x, w = rest.pop(0), rest.pop(0)
        u = rest.pop(0) if silu_mul else None
        b = rest.pop(0) if has_bias else None
        r = rest.pop(0) if has_res else None
        (o,) = rest
        return cls(x, w, u, b, r, o, layer)

    @property
    def streamed(self) -> tuple:
        """The operands the pipeline streams along K: x, w and (SiLU) w_up."""
        return (self.x, self.w) + ((self.u,) if self.u is not None else ())


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One persistent pass over an [M, n_tiles * cta_n] block of output columns from col0:
    its static tiling, pipeline depth and epilogue staging."""

    cfg: MgpuConfig
    m_tiles: int
    n_tiles: int
    col0: int
    k_iters: int
    cluster: int
    cluster_axis: str
    has_bias: bool
    has_res: bool
    silu_mul: bool
    interpret: bool

    @property
    def split_m(self) -> bool:
        return self.cfg.wg_split == "m"

    @property
    def stages(self) -> int:
        # No deeper than the K steps: a pipeline deeper than its steps, run again for a
        # CTA's next tile, trips the interpreter's barrier checks (and buys nothing).
        return min(self.cfg.stages, self.k_iters)

    @property
    def release(self) -> int:
        return min(self.cfg.delay_release, self.stages - 1)  # a 1-step pipeline cannot release late

    @property
    def slots(self) -> int:
        """Output staging slots per warpgroup."""
        subs = self.cfg.epi_subtiles
        return min(self.cfg.out_slots, subs) if self.has_res else min(2, subs)

    @property
    def chain(self) -> bool:
        """One pipeline across a CTA's tiles (it needs the K steps to fill whole stages)."""
        return self.cfg.chain_tiles and self.k_iters % self.stages == 0

    @property
    def wgmma_groups(self) -> int:
        """wgmma groups a K step issues per warpgroup (two accumulators with SiLU x up)."""
        return 2 if self.silu_mul else 1


def _in_specs(p: _Pass, dtype) -> list:
    """TMA block specs of x's [cta_m, tile_k] and each weight's [tile_k, cta_n] tiles; the
    operand a CTA pair shares is loaded once per cluster and multicast to both CTAs."""
    cfg = p.cfg
    # wgmma reads both operands with one swizzle: 128 bytes where a warpgroup's weight
    # columns are a multiple of 64, less for the 96/112-column tiles that fill SMs better
    # (a warpgroup's column slice must be whole swizzle tiles).
    bits = 8 * jnp.dtype(dtype).itemsize
    swizzle = min(plgpu.find_swizzle(cfg.tile_k * bits), plgpu.find_swizzle(cfg.tile_n * bits))
    in_tf = _smem_transforms(cfg.tile_k, dtype, swizzle)
    w_tf = _smem_transforms(cfg.cta_n, dtype, swizzle)
    multicast = p.cluster > 1 and not p.interpret
    shared = lambda axis: ("cluster",) if multicast and p.cluster_axis == axis else ()  # noqa: E731
    specs = [plgpu.BlockSpec((cfg.cta_m, cfg.tile_k), lambda k: (0, k), transforms=in_tf,
                             memory_space=plgpu.SMEM, delay_release=p.release, collective_axes=shared("n"))]
    for _ in range(p.wgmma_groups):
        specs.append(plgpu.BlockSpec((cfg.tile_k, cfg.cta_n), lambda k: (k, 0), transforms=w_tf,
                                     memory_space=plgpu.SMEM, delay_release=p.release,
                                     collective_axes=shared("m")))
    return specs


def _mma_body(p: _Pass, wg) -> Callable:
    """One K step of the pipeline for warpgroup `wg`: its rows (split along M) or columns
    (along N) of the CTA's operand tiles into its accumulator(s)."""
    tm, tn = p.cfg.tile_m, p.cfg.tile_n

    def mma(_, a_s, *b_s_and_acc):
        *b_s, acc = b_s_and_acc
        a_wg = a_s.at[pl.ds(wg * tm, tm)] if p.split_m else a_s
        b_wg = [b if p.split_m else b.at[:, pl.ds(wg * tn, tn)] for b in b_s]
        if p.silu_mul:
            plgpu.wgmma(acc[0], a_wg, b_wg[0])
            plgpu.wgmma(acc[1], a_wg, b_wg[1])
        else:
            plgpu.wgmma(acc, a_wg, b_wg[0])
        # With delayed release the previous step's slots stay valid while this
        # step's wgmma groups run.
        plgpu.wgmma_wait(p.release * p.wgmma_groups)
        return acc

    return mma


class _Staging(NamedTuple):
    """Shared memory of the epilogue: output slots per warpgroup, the bias row, barriers."""

    out: Any
    bias: Any
    bar: Any


def _sub_slices(p: _Pass, origin: tuple, e: int) -> tuple:
    """Global rows and columns of epilogue sub-tile e of a warpgroup's tile at origin."""
    em_i, en_i = divmod(e, p.cfg.tile_n // p.cfg.epi_n)
    return (pl.ds(origin[0] + em_i * p.cfg.epi_m, p.cfg.epi_m),
            pl.ds(origin[1] + en_i * p.cfg.epi_n, p.cfg.epi_n))


def _load_residual(p: _Pass, refs: _Refs, st: _Staging, wg, origin: tuple, e: int) -> None:
    """Starts the TMA load of sub-tile e's residual into its staging slot."""
    rows, cols = _sub_slices(p, origin, e)
    slot = e % p.slots
    plgpu.copy_gmem_to_smem(refs.r.at[rows, cols], st.out.at[wg, slot], st.bar.at[wg * p.slots + slot])


def _epilogue(p: _Pass, acc, refs: _Refs, st: _Staging, wg, origin: tuple) -> None:
    """The f32 accumulator (+ bias)(+ residual), rounded once, stored by TMA sub-tile by
    sub-tile through the staging slots."""
    em, en, slots = p.cfg.epi_m, p.cfg.epi_n, p.slots
    n_epi = p.cfg.tile_n // en
    if not p.has_res:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for e in range(p.cfg.epi_subtiles):
        em_i, en_i = divmod(e, n_epi)
        slot = e % slots
        rows, cols = _sub_slices(p, origin, e)
        part = acc[em_i * em:(em_i + 1) * em, en_i * en:(en_i + 1) * en]
        if p.has_bias:
            plgpu.copy_gmem_to_smem(refs.b.at[cols], st.bias.at[wg], st.bar.at[2 * slots + wg])
            plgpu.barrier_wait(st.bar.at[2 * slots + wg])
            if p.interpret:  # the interpreter has no layouts (and no load_p)
                bvec = st.bias[wg]
            else:  # a row vector in the accumulator's column layout
                bvec = plgpu.load(st.bias.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
            part = part + lax.broadcast_in_dim(bvec.astype(F32), (em, en), (1,))
        if p.has_res:
            if e >= slots:  # slot reuse: its store has read it, then refill
                plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                _load_residual(p, refs, st, wg, origin, e)
            plgpu.barrier_wait(st.bar.at[wg * slots + slot])
            part = part + st.out[wg, slot].astype(F32)
        else:  # slot reuse: wait until the copy issued `slots` ago has read it
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
        st.out[wg, slot] = part.astype(refs.o.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st.out.at[wg, slot], refs.o.at[rows, cols])


def _compute_context(p: _Pass, refs: _Refs, st: _Staging, wg, origin: tuple) -> Callable:
    """The pipeline's compute context for one tile: prefetch the residual, allocate the
    accumulator(s), run the K loop, then the epilogue (SiLU x up first)."""
    tm, tn = p.cfg.tile_m, p.cfg.tile_n

    def context(run):
        if p.has_res:
            # The previous tile's stores must have left the slots; then the first
            # residual sub-tiles load while the main loop runs.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for e in range(p.slots):
                _load_residual(p, refs, st, wg, origin, e)
        accs = dict(g=plgpu.ACC((tm, tn), F32))
        if p.silu_mul:
            accs["u"] = plgpu.ACC((tm, tn), F32)

        @functools.partial(pl.run_scoped, **accs)
        def _acc(g, u=None):
            run((g, u) if p.silu_mul else g)
            acc = g[...]
            if p.silu_mul:
                acc = acc / (1.0 + jnp.exp(-acc)) * u[...]
            _epilogue(p, acc, refs, st, wg, origin)

    return context


def _pipeline(p: _Pass, specs: list, body: Callable, context: Callable, state=None):
    """The warp-specialized K pipeline: one TMA producer warpgroup, two compute ones."""
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(p.k_iters,), memory_registers=40, in_specs=specs, wg_axis="wg",
        num_compute_wgs=2, max_concurrent_steps=p.stages, compute_context=context,
        pipeline_state=state)


def _run_tile(p: _Pass, specs: list, mma: Callable, context: Callable, tile_ins: tuple, allocs, info) -> None:
    """Runs one tile's pipeline; chained, the first of a CTA's tiles fills the pipeline,
    the last drains it, the ones between keep it running (a CTA with one tile does both,
    unchained)."""
    if not p.chain:
        _pipeline(p, specs, mma, context)(*tile_ins, allocations=allocs)
        return
    first, last = info.local_index == 0, info.local_index == info.num_local_steps - 1
    state = jnp.where(first, int(plgpu.PipelinePipeline.START),
                      jnp.where(last, int(plgpu.PipelinePipeline.STOP),
                                int(plgpu.PipelinePipeline.STEADY))).astype(jnp.int32)
    lax.cond(first & last,
             lambda: _pipeline(p, specs, mma, context)(*tile_ins, allocations=allocs),
             lambda: _pipeline(p, specs, mma, context, state)(*tile_ins, allocations=allocs))


def _tile_pass(*refs, cfg: MgpuConfig, m_tiles: int, n_tiles: int, col0: int, k_iters: int,
               cluster: int, cluster_axis: str, has_bias: bool, has_res: bool, silu_mul: bool,
               interpret: bool, stacked: bool = False) -> None:
    """One persistent loop over an [M, n_tiles * cta_n] block of output columns from col0."""
    p = _Pass(cfg, m_tiles, n_tiles, col0, k_iters, cluster, cluster_axis, has_bias, has_res,
              silu_mul, interpret)
    g = _Refs.unpack(refs, silu_mul, has_bias, has_res, stacked)
    specs = _in_specs(p, g.x.dtype)
    noop = lambda *_, **__: None  # noqa: E731
    scratch = dict(
        allocs=_pipeline(p, specs, noop, noop).get_allocations(g.x, *(w.at[0] if stacked else w for w in g.streamed[1:])),
        out_smem=plgpu.SMEM((2, p.slots, cfg.epi_m, cfg.epi_n), g.o.dtype,
                            transforms=_smem_transforms(cfg.epi_n, g.o.dtype)),
        bias_smem=plgpu.SMEM((2, cfg.epi_n), g.b.dtype) if has_bias else None,
        bar=plgpu.Barrier(num_barriers=2 * p.slots + 2) if (has_res or has_bias) else None,
    )

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, bias_smem, bar):
        st = _Staging(out_smem, bias_smem, bar)
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cluster") if cluster > 1 else 0
        # A cluster's CTAs take neighbouring M tiles of one N tile, or the other way round.
        along_m = cluster_axis == "m"
        pm, pn = (m_tiles // cluster, n_tiles) if along_m else (m_tiles, n_tiles // cluster)
        cm, cn = cfg.cta_m, cfg.cta_n
        mma = _mma_body(p, wg)
        weights = [w.at[g.layer[0]] if stacked else w for w in g.streamed[1:]]  # [K, N] views

        @plgpu.nd_loop((pm * pn * cfg.k_splits,), collective_axes="programs")
        def _tile(info):
            (t,) = info.index
            k_split, t = t // (pm * pn), t % (pm * pn)
            m_idx, n_idx = tile_coords(t, pm, pn, cfg.group_m)
            if along_m:
                m_idx = m_idx * cluster + cta
            else:
                n_idx = n_idx * cluster + cta
            # With split K each split writes its own [M, N] block of partial sums.
            origin = ((k_split * m_tiles + m_idx) * cm + (wg * cfg.tile_m if p.split_m else 0),
                      col0 + n_idx * cn + (0 if p.split_m else wg * cfg.tile_n))
            k_sl = pl.ds(k_split * k_iters * cfg.tile_k, k_iters * cfg.tile_k)
            tile_ins = (g.x.at[pl.ds(m_idx * cm, cm), k_sl],
                        *(w.at[k_sl, pl.ds(col0 + n_idx * cn, cn)] for w in weights))
            _run_tile(p, specs, mma, _compute_context(p, g, st, wg, origin), tile_ins, allocs, info)

        # The stores must have read the staging slots before a next pass reuses them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _launch_axes(clusters: int, cluster: int, interpret: bool) -> dict:
    """Grid of clusters; a pair's CTAs are told apart by the "cluster" axis. The CPU
    interpreter (jax 0.10) cannot allocate cluster barriers, so there a pair runs as two
    ordinary CTAs on a second grid axis, each loading its own weight tiles (the same
    tiles and output placement; only the multicast is GPU-only)."""
    if cluster == 1:
        return dict(grid=(clusters,), grid_names=("programs",))
    if interpret:
        return dict(grid=(clusters, cluster), grid_names=("programs", "cluster"))
    return dict(grid=(clusters,), grid_names=("programs",), cluster=(cluster,), cluster_names=("cluster",))


def gemm_mgpu(x: jax.Array, w: jax.Array, *, w_up: jax.Array | None = None,
              bias: jax.Array | None = None, residual: jax.Array | None = None,
              num_programs: int | None = None, interpret: bool = False,
              config: MgpuConfig | None = None, layer: jax.Array | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (+bias)(+residual); with w_up: silu(x@w) * (x@w_up). bf16/f16.

    layer: w (and w_up) are the stacked [L, K, N] weights of every layer and this int32
    scalar picks one; the kernel reads that layer's tiles in place (its TMA copies start at
    the layer), so no XLA slice of the stack is ever materialized.
    M, N and K are padded to the CTA tile and tile_k where they do not divide.
    """
    silu = w_up is not None
    stacked = layer is not None
    m, k = x.shape
    n = w.shape[-1]
    budget = num_programs if num_programs is not None else num_sms()
    cfg = config or choose_config(m, n, silu, residual is not None, budget, k=k)
    splits = cfg.k_splits
    if splits > 1 and silu:
        raise ValueError("k_splits > 1 needs the whole sum before SiLU: use it for plain GEMMs")
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    xp = pad_axis(pad_axis(x, 0, cta_m), 1, cfg.tile_k * splits)
    lead = 1 if stacked else 0
    pad_w = lambda a: pad_axis(pad_axis(a, lead, cfg.tile_k * splits), lead + 1, cta_n)
    ins = ([jnp.asarray(layer, jnp.int32).reshape(1)] if stacked else []) + [xp, pad_w(w)] + ([pad_w(w_up)] if silu else [])
    in_kernel = splits == 1  # split K: bias and residual join the partial sums in XLA
    if bias is not None and in_kernel:
        ins.append(pad_axis(bias, 0, cta_n))
    if residual is not None and in_kernel:
        ins.append(pad_axis(pad_axis(residual.astype(x.dtype), 0, cta_m), 1, cta_n))
    mp, kp = xp.shape
    np_ = ins[lead + 1].shape[-1]
    m_tiles, n_tiles = mp // cta_m, np_ // cta_n
    # CTA pairs need an even number of tiles along their axis and two SMs; otherwise
    # CTAs run alone.
    cluster, cluster_axis = cfg.cluster
    if budget < 2 or (m_tiles if cluster_axis == "m" else n_tiles) % cluster:
        cluster = 1
    # The budget counts CTAs (SMs); the grid counts clusters.
    progs = resolve_programs(num_programs, m_tiles * n_tiles * splits)
    clusters = max(1, min(progs // cluster, m_tiles * n_tiles // cluster * splits))
    tail = tail_tiles(m_tiles, n_tiles, clusters * cluster) if cfg.split_tail else 0

    def call(passes: tuple[str, ...]) -> jax.Array:
        kernel = functools.partial(_kernel, cfg=cfg, m_tiles=m_tiles, n_tiles=n_tiles, tail=tail,
                                   passes=passes, k_iters=kp // (cfg.tile_k * splits), cluster=cluster,
                                   cluster_axis=cluster_axis,
                                   has_bias=bias is not None and in_kernel,
                                   has_res=residual is not None and in_kernel, silu_mul=silu,
                                   interpret=interpret, stacked=stacked)
        return plgpu.kernel(
            kernel,
            out_type=jax.ShapeDtypeStruct((splits * mp, np_), x.dtype if in_kernel else F32),
            **_launch_axes(clusters, cluster, interpret),
            num_threads=3, thread_name="wg",
            compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
            interpret=mosaic_interpret_params() if interpret else False,
        )(*ins)

    if interpret and tail:
        # jax 0.10's CPU interpreter deadlocks on a kernel with a second warp-specialized
        # pipeline, so there each pass is its own launch and the columns are joined after
        # (a column a pass should write but does not stays NaN and fails tests).
        c0 = (n_tiles - tail) * cfg.cta_n
        out = jnp.concatenate([call(("main",))[:, :c0], call(("tail",))[:, c0:]], axis=1)
    else:
        out = call(("main", "tail"))
    if not in_kernel:
        out = out.reshape(splits, mp, np_)[:, :m, :n].sum(axis=0)
        if bias is not None:
            out = out + bias.astype(F32)
        if residual is not None:
            out = out + residual.astype(F32)
        return out.astype(x.dtype)
    return out[:m, :n] if (mp, np_) != (m, n) else out
