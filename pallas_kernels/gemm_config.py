"""Launch configurations of the Mosaic GPU GEMM (`gemm_mgpu`) and how one is chosen.

`MgpuConfig` is one launch; `choose_config` returns the configuration an H200 search
measured best for the kind of GEMM and M (`bench.gemm_tune`), else a wave-model tile.
"""

from __future__ import annotations

import dataclasses


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

    def smem_bytes(self, silu: bool, itemsize: int = 2) -> int:
        """Shared memory of the TMA stages plus the output staging slots (f32 with split K)."""
        stage = self.cta_m * self.tile_k + (2 if silu else 1) * self.tile_k * self.cta_n
        out_itemsize = 4 if self.k_splits > 1 else itemsize
        return itemsize * self.stages * stage + out_itemsize * 2 * self.out_slots * self.epi_m * self.epi_n


SMEM_BYTES = 227 * 1024  # per block on Hopper


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
