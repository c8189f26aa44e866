"""Launch configurations of the Mosaic GPU GEMM (`gemm_mgpu`) and how one is chosen.

`MgpuConfig` is one launch; `choose_config` returns the configuration measured best on
this device for the kind of GEMM and M, else a wave-model tile. Measured configurations
are data: one table per device in pallas_kernels/tuned/ (gemm_h200.json, keyed by the
device name, kind and M bound; written by `bench.gemm_tune`). A table from `bench.gemm_tune
--table-out` on the machine at hand, named by $NANOFLOW_GEMM_TABLE, replaces the shipped
one for the M it covers. A device without a table (an H100, say) gets the wave model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax

from nanoflow_jax import env


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


REFERENCE_DEVICE = "NVIDIA H200"  # the table CPU runs (interpreter, CUDA lowering) choose from
TUNED_DIR = Path(__file__).parent / "tuned"
TABLE_ENV = env.GEMM_TABLE.name
# Residual GEMMs whose reduction is deep (K >= DEEP_K x N: the MLP's down projection) have
# rows of their own: at M = 256 they prefer split K, which loses on O + residual.
DEEP_K = 2

Table = dict[str, tuple[tuple[float, MgpuConfig], ...]]
_log = logging.getLogger(__name__)


def gemm_kind(silu: bool, has_res: bool, n: int, k: int | None) -> str:
    """The tuned table's kind of a GEMM: "silu", "residual_deep" (K >= DEEP_K x N),
    "residual" or "plain"."""
    if silu:
        return "silu"
    if has_res:
        return "residual_deep" if k is not None and k >= DEEP_K * n else "residual"
    return "plain"


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> Table:
    """A GEMM table file, shipped (tuned/gemm_*.json) or written by `bench.gemm_tune
    --table-out`: {"configs": {kind: [[max_m, MgpuConfig fields], ...]}}, max_m null (or
    Infinity) for a last row that takes every larger M. Rows come back by increasing M."""
    try:
        rows = json.loads(Path(path).read_text())["configs"]
        return {kind: tuple(sorted(((float("inf") if b is None else float(b), MgpuConfig(**c))
                                    for b, c in entries), key=lambda r: r[0]))
                for kind, entries in rows.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a GEMM table ({exc}): write one with `python -m "
                         f"bench.gemm_tune --table-out`, or unset ${TABLE_ENV}") from exc


@functools.lru_cache(maxsize=1)
def shipped_tables() -> dict[str, str]:
    """Device name (JAX's device_kind, e.g. "NVIDIA H200") -> its shipped table's path."""
    return {json.loads(p.read_text())["device"]: str(p) for p in sorted(TUNED_DIR.glob("gemm_*.json"))}


def current_device() -> str:
    """The device whose table applies: the GPU's kind, or on a CPU (interpreted kernels,
    CUDA lowering) the reference device, whose rows the CPU tests check."""
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform == "gpu" else REFERENCE_DEVICE


@functools.lru_cache(maxsize=None)
def _warn_untuned(device: str) -> None:
    _log.warning("no tuned GEMM table for %s (shipped: %s): GEMM tiles come from the wave "
                 "model; `python -m bench.gemm_tune --table-out T.json` and $%s=T.json tune them",
                 device, ", ".join(shipped_tables()) or "none", TABLE_ENV)


def tuned_table(device: str | None = None) -> Table | None:
    """The shipped table of `device` (default: `current_device()`); None, logged once per
    device, where none is shipped."""
    device = device or current_device()
    path = shipped_tables().get(device)
    if path is None:
        _warn_untuned(device)
        return None
    return load_table(path)


def _kind_rows(table: Table, kind: str) -> tuple[tuple[float, MgpuConfig], ...]:
    """A kind's rows; tables without deep residual rows give those GEMMs the residual ones."""
    return table.get(kind) or (table.get("residual", ()) if kind == "residual_deep" else ())


def _tuned_rows(kind: str, m: int) -> tuple[tuple[float, MgpuConfig], ...]:
    """$NANOFLOW_GEMM_TABLE's rows for this kind where it covers M (from its smallest to
    its largest searched M), else the shipped table's for this device (none: empty)."""
    path = env.gemm_table()
    rows = _kind_rows(load_table(path), kind) if path else ()
    if rows and rows[0][0] <= m <= rows[-1][0]:
        return rows
    shipped = tuned_table()
    return _kind_rows(shipped, kind) if shipped else ()


def choose_config(m: int, n: int, silu: bool, has_res: bool, programs: int, k: int | None = None) -> MgpuConfig:
    """The tuned configuration for this kind of GEMM (`gemm_kind`; K tells the deep
    residual GEMMs apart) when the device has one, M is in the searched range (>= 128)
    and N divides its CTA width; otherwise (decode-sized M, SmolLM2's 576-wide N) the tile that minimises
    waves x tile cost on `programs` SMs (a simple model), so small batches still spread
    over many SMs."""
    kind = gemm_kind(silu, has_res, n, k)
    tuned = next((cfg for bound, cfg in _tuned_rows(kind, m) if m <= bound), None)
    if tuned is not None and m >= 128 and n % tuned.cta_n == 0:
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
    if small_res:  # 128 x 64 tiles fill more SMs at M <= 512 (bench/RESULTS.md, GEMM table)
        tm, tn = 128, 64
    # Otherwise the residual's staging buffer leaves room for 3 pipeline stages, not 4.
    stages = 6 if small_res else 3 if has_res else 4
    return MgpuConfig(tile_m=tm, tile_n=tn, epi_m=min(64, tm), epi_n=min(64, tn), stages=stages,
                      delay_release=1 if (silu or small_res) else 0)
