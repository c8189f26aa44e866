"""Launch configurations of the Mosaic GPU GEMM (`gemm_mgpu`) and how one is chosen.

`MgpuConfig` is one launch; `choose_config` returns the configuration an H200 search
measured best for the kind of GEMM and M (`bench.gemm_tune`), else a wave-model tile.
A table written by `bench.gemm_tune --table-out` on the machine at hand, named by
$NANOFLOW_GEMM_TABLE, replaces the committed one for the M it covers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path


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
    # One TMA pipeline across a CTA's tiles: the producer loads the next tile's operands
    # while the compute warpgroups run this tile's epilogue. Used where the K steps per
    # tile divide into `stages`; Mosaic's pipeline chaining excludes delayed release.
    chain_tiles: bool = False
    # CTAs per cluster along M (1 or 2): a pair of CTAs on neighbouring M tiles loads
    # each weight tile once from L2 and TMA-multicasts it to both, halving weight traffic.
    cluster_m: int = 1
    # CTAs per cluster along N (1 or 2): a pair on neighbouring N tiles of one M tile
    # multicasts each activation tile instead, for GEMMs whose CTAs re-read x more than w
    # (down + residual at M = 256: 64 CTAs read each 128-row slice of x).
    cluster_n: int = 1
    # Run the last, partial wave's columns as half-width tiles after the rest (tail_tiles
    # in gemm_mgpu.py): 128-byte swizzles kept, one launch, no partial sums.
    split_tail: bool = False

    def __post_init__(self) -> None:
        if self.chain_tiles and self.delay_release:
            raise ValueError("chain_tiles needs delay_release=0 (Mosaic cannot chain "
                             "pipelines that release operands late)")
        if self.cluster_m not in (1, 2) or self.cluster_n not in (1, 2):
            raise ValueError(f"cluster_m and cluster_n must be 1 or 2, got {self.cluster_m}, {self.cluster_n}")
        if self.cluster_m > 1 and self.cluster_n > 1:
            raise ValueError("CTA pairs run along M or along N, not both: set cluster_m or cluster_n to 1")
        if self.cluster_n > 1 and self.split_tail:
            raise ValueError("split_tail changes the N tiling a cluster_n pair shares: use one of them")
        if self.split_tail and (self.tile_n % 32 or self.k_splits > 1):
            raise ValueError("split_tail halves tile_n, which must stay a multiple of 16 "
                             f"(tile_n={self.tile_n}), and excludes split K (k_splits={self.k_splits})")
        # The narrowest (32-byte) swizzle is 16 bf16 columns; the epilogue walks whole
        # sub-tiles. (A GPU also needs tile_m a multiple of 64, wgmma's rows; CPU tests
        # use smaller tiles.)
        if self.tile_n % 16 or self.tile_m % self.epi_m or self.tile_n % self.epi_n:
            raise ValueError(f"tile_n must be a multiple of 16 and of epi_n, tile_m one of epi_m; "
                             f"got tile {self.tile_m}x{self.tile_n}, epilogue {self.epi_m}x{self.epi_n}")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" else 1)

    @property
    def epi_subtiles(self) -> int:
        """Epilogue sub-tiles of one warpgroup's tile."""
        return (self.tile_m // self.epi_m) * (self.tile_n // self.epi_n)

    @property
    def cluster(self) -> tuple[int, str]:
        """CTAs per cluster and the axis a pair's CTAs run along ("m": they share weight
        tiles; "n": they share activation tiles)."""
        return (self.cluster_n, "n") if self.cluster_n > 1 else (self.cluster_m, "m")

    def smem_bytes(self, silu: bool, itemsize: int = 2) -> int:
        """Shared memory of the TMA stages plus the output staging slots (f32 with split K;
        no more slots than a warpgroup's epilogue has sub-tiles)."""
        stage = self.cta_m * self.tile_k + (2 if silu else 1) * self.tile_k * self.cta_n
        out_itemsize = 4 if self.k_splits > 1 else itemsize
        slots = min(self.out_slots, self.epi_subtiles)
        return itemsize * self.stages * stage + out_itemsize * 2 * slots * self.epi_m * self.epi_n


SMEM_BYTES = 227 * 1024  # per block on Hopper


# Fallback warpgroup tiles (tile_m, tile_n, relative efficiency): bigger tiles reuse operands
# better; smaller ones fill more SMs when M or N is small. tile_n stays a multiple of
# 64 (the 128-byte swizzle width): a warpgroup's column slice of the B tile must be
# whole swizzle tiles on a GPU (the CPU interpreter does not check this).
_PLAIN_TILES = ((128, 128, 1.0), (128, 64, 0.88), (64, 64, 0.75))
_SILU_TILES = ((128, 64, 1.0), (64, 64, 0.85))


# The H200 searches' winners at full grid (bench/results/gemm_tune*_h200.json), per kind
# of GEMM and dense batch M (first row with M <= its bound). Small-M timings vary by up
# to 2x between runs, so rows there are the configurations best on average over runs.
# vs the wave-model choice: QKV at M >= 1024 0.49-0.58 -> 0.73-0.87 of the library;
# the residual GEMMs at M <= 512 0.32-0.50 -> 0.48-0.77 and, chained, at M = 1024
# 0.64/0.76 -> 0.73/0.88; gate/up+SiLU 0.77-0.95 -> 0.84-0.98. The M = 128 (decode)
# rows are `bench.gemm_tune --table-out` winners with the weights rotated past L2
# (gemm_table_m128_h200.json): split K lifts O + residual from 0.45 to 0.71 and the
# engine from 15,410 to 16,683 tokens/s in one run (throughput_*_m128table_h200_s7.json).
# Session 8 (gemm_tune_s8_*_h200.json): at M = 256 split K on 128x128 CTAs lifts O + residual
# from 0.38-0.52 to 0.80 and down + residual from 0.54-0.57 to 0.85 of the library; CTA
# pairs sharing weight tiles (cluster_m=2) lift gate/up+SiLU there 0.80-0.86 -> 0.86-0.89
# and lose at M = 512. At M = 512, 128x192 CTAs give QKV's 6144 columns one wave of 128
# tiles on 132 SMs: 0.65 -> 0.71 alone, 0.75 in pairs. Elsewhere pairs moved results by
# less than the 10-30% run-to-run spread.
# Session 10 (bench.gemm_ab on one CUPTI timeline, gemm_ab_s10_h200.json): warpgroups split
# along M (64 x 128 each) win gate/up + SiLU at M = 256 (worst ratio to the library 0.921 ->
# 0.938) and, with tiles chained, at M = 512 (0.944 -> 0.956), and the residual GEMMs at
# M = 256 with split K (0.917 -> 0.942). Session 11 (gemm_ab_s11_h200.json): QKV at M > 512
# walks groups of 8 M tiles (group_m=8: 0.893 -> 0.961 at M = 1024/2048). gemm_ab_s11b_h200.json:
# the residual GEMMs at M = 256 on 128 x 64 CTAs with the residual fused, no split K (one
# kernel instead of the split plus XLA's sum: 0.936 -> 0.953; O + residual 0.85-0.94 ->
# 1.02-1.04 in the next runs). Gate/up + SiLU at M = 512 on 64 x 128 CTAs also won there
# (0.849 -> 0.929), but the committed row's 0.849 was an outlier: in the table runs the
# old row read 0.943 / 0.945 and the new one 0.927 / 0.924 (two runs each); the old stays.
# Session 12 (gemm_ab_s12_h200.json): at M = 128 QKV on 128 x 64 CTAs without split K
# (19.9 -> 16.6 us, 0.904 -> 1.086 of the library) and O/down + residual on 128 x 64 CTAs
# with 2 K splits (0.931 -> 0.958); the engine with both: 19,676 -> 19,864 tokens/s in one
# call (throughput_llama3_8b_pallas*_h200_s12.json). Gate/up + SiLU at M = 512 runs the last
# partial wave's 13 columns as 104 half-width tiles (split_tail): 173.3 -> 159.0 us, 0.940 ->
# 1.025 of the library (gemm_ab_s12d_h200.json); 96/112-column tiles lost (0.46-0.62).
_TUNED: dict[str, tuple[tuple[float, MgpuConfig], ...]] = {
    "plain": ((128, MgpuConfig(tile_m=64, tile_n=64, stages=8, delay_release=1, wg_split="m")),
              (256, MgpuConfig(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m")),
              (512, MgpuConfig(tile_m=64, tile_n=192, stages=4, delay_release=1, wg_split="m", cluster_m=2)),
              (float("inf"), MgpuConfig(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m",
                                        group_m=8))),
    # M = 128 (decode) keeps the configuration the engine's throughput runs measured.
    "silu": ((128, MgpuConfig(tile_m=128, tile_n=64, stages=4, delay_release=1)),
             (256, MgpuConfig(tile_m=64, tile_n=128, stages=4, delay_release=1, wg_split="m")),
             (512, MgpuConfig(tile_m=64, tile_n=128, stages=4, wg_split="m", chain_tiles=True,
                              split_tail=True)),
             (float("inf"), MgpuConfig(tile_m=64, tile_n=128, stages=4, delay_release=1, wg_split="m"))),
    "residual": ((128, MgpuConfig(tile_m=64, tile_n=64, stages=6, delay_release=1, wg_split="m", k_splits=2)),
                 (256, MgpuConfig(tile_m=64, tile_n=64, stages=8, delay_release=1, wg_split="m")),
                 (512, MgpuConfig(tile_m=64, tile_n=128, stages=6, delay_release=1, wg_split="m")),
                 (float("inf"), MgpuConfig(tile_m=128, tile_n=128, stages=4, chain_tiles=True))),
}
# Residual GEMMs whose reduction is deep (K >= DEEP_K x N: the MLP's down projection) at
# M = 256 run 128 x 128 CTAs with 2 K splits (64 tiles x 2 splits, the partial sums and
# residual summed by XLA), as XLA's own dot does: in four same-timeline A/Bs down + residual
# took 46.4-47.1 us against 47.5-48.5 for the 128 x 64 fused row, which wins O + residual by
# 15-20% (gemm_ab_s10/s11b/s13/s13c_h200.json); in the first table runs with it, 0.966-0.984 of
# the library against 0.943-0.970 before (kernels_gemm_s14*_h200.json). Other M share the residual rows.
DEEP_K = 2
_TUNED["residual_deep"] = tuple(
    (bound, MgpuConfig(tile_m=64, tile_n=128, stages=5, delay_release=1, wg_split="m", k_splits=2)
     if bound == 256 else cfg) for bound, cfg in _TUNED["residual"])


def gemm_kind(silu: bool, has_res: bool, n: int, k: int | None) -> str:
    """The `_TUNED` kind of a GEMM: "silu", "residual_deep" (K >= DEEP_K x N), "residual"
    or "plain"."""
    if silu:
        return "silu"
    if has_res:
        return "residual_deep" if k is not None and k >= DEEP_K * n else "residual"
    return "plain"


TABLE_ENV = "NANOFLOW_GEMM_TABLE"


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> dict[str, tuple[tuple[float, MgpuConfig], ...]]:
    """A `bench.gemm_tune --table-out` file: {"configs": {kind: [[max_m, config], ...]}}."""
    try:
        rows = json.loads(Path(path).read_text())["configs"]
        return {kind: tuple(sorted(((float(b), MgpuConfig(**c)) for b, c in entries), key=lambda r: r[0]))
                for kind, entries in rows.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"${TABLE_ENV}={path} is not a GEMM table from `python -m bench.gemm_tune "
                         f"--table-out` ({exc}); fix the file or unset ${TABLE_ENV}") from exc


def _tuned_rows(kind: str, m: int) -> tuple[tuple[float, MgpuConfig], ...]:
    """The measured table's rows for this kind where it covers M (from its smallest to
    its largest searched M), else the committed ones."""
    path = os.environ.get(TABLE_ENV)
    table = load_table(path) if path else {}
    # Tables written before the deep kind give the deep GEMMs their residual rows.
    rows = table.get(kind) or (table.get("residual", ()) if kind == "residual_deep" else ())
    return rows if rows and rows[0][0] <= m <= rows[-1][0] else _TUNED[kind]


def choose_config(m: int, n: int, silu: bool, has_res: bool, programs: int, k: int | None = None) -> MgpuConfig:
    """The measured configuration for this kind of GEMM (`gemm_kind`; K tells the deep
    residual GEMMs apart) when M is in the searched range (>= 128) and N divides its CTA
    width; otherwise (decode-sized M, SmolLM2's 576-wide N) the tile that minimises
    waves x tile cost on `programs` SMs (a simple model), so small batches still spread
    over many SMs."""
    kind = gemm_kind(silu, has_res, n, k)
    tuned = next(cfg for bound, cfg in _tuned_rows(kind, m) if m <= bound)
    if m >= 128 and n % tuned.cta_n == 0:
        tiles = -(-m // tuned.cta_m) * (n // tuned.cta_n)
        # Split K only where the output tiles alone leave SMs idle (its partial sums
        # cost an extra pass over M x N in f32).
        return tuned if tiles < programs else dataclasses.replace(tuned, k_splits=1)
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
