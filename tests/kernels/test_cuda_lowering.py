"""Every kernel, and every tuned GEMM configuration, lowers for CUDA on this CPU machine.

`jax.export` with platforms=["cuda"] runs the real GPU lowering (Pallas -> Triton IR,
Pallas -> Mosaic GPU including its shared-memory check) without a GPU, so a kernel or a
tuned-table row that a GPU would reject at compile time fails here, in CI, instead of on
a GPU machine. (Triton's own PTX compile still happens only on the GPU.)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels as pk
from pallas_kernels.gemm_config import MgpuConfig, shipped_tables, load_table
from pallas_kernels.gemm_mgpu import gemm_mgpu

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
GPU_CALLS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
H, KV, D, PS = 32, 8, 128, 16  # Llama-3-8B attention


def lower_for_cuda(fn, *shapes) -> set[str]:
    """The GPU custom calls in fn's CUDA lowering (raises what the GPU lowering raises)."""
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in GPU_CALLS]
    text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*shapes).mlir_module()
    return set(re.findall(r"custom_call @([\w$.]+)", text)) & set(GPU_CALLS)


def _tuned_cases():
    """(kind, config, M) for each row of every shipped table, at Llama-3-8B's N and K."""
    for device, path in shipped_tables().items():
        for kind, rows in load_table(path).items():
            for bound, cfg in rows:
                m = 2048 if bound == float("inf") else int(bound)
                yield pytest.param(kind, cfg, m, id=f"{device.split()[-1]}-{kind}-m{m}")


_DR = dict(delay_release=1, wg_split="m")
# Launch features the tuned rows do not combine (what a tuner's candidates try): CTA pairs
# along M and N, wider tile orders, 128-deep K steps, four residual slots, 256 x 128 CTAs
# chained or releasing late, an unchained split tail.
FEATURE_CONFIGS = {
    "m64x128_pairs_m": ("plain", 2048, MgpuConfig(tile_m=64, tile_n=128, stages=6, cluster_m=2, **_DR)),
    "m64x128_group16": ("plain", 2048, MgpuConfig(tile_m=64, tile_n=128, stages=6, group_m=16, **_DR)),
    "m64x64_pairs_n": ("plain", 256, MgpuConfig(tile_m=64, tile_n=64, stages=8, cluster_n=2, **_DR)),
    "m64x128_k128": ("plain", 1024, MgpuConfig(tile_m=64, tile_n=128, tile_k=128, stages=3, **_DR)),
    "m64x128_slots4": ("residual", 512, MgpuConfig(tile_m=64, stages=5, out_slots=4, **_DR)),
    "m128x128_chained": ("residual", 2048, MgpuConfig(wg_split="m", chain_tiles=True)),
    "n128x128_dr1_pairs": ("residual", 2048, MgpuConfig(delay_release=1, cluster_m=2)),
    "n128x128_chained_pairs": ("residual", 2048, MgpuConfig(chain_tiles=True, cluster_m=2)),
    "n128x128_chained_group8": ("residual_deep", 2048, MgpuConfig(chain_tiles=True, group_m=8)),
    "m64x64_fused": ("residual_deep", 256, MgpuConfig(tile_m=64, tile_n=64, stages=8, **_DR)),
    "m64x128_dr1_tail": ("silu", 512, MgpuConfig(tile_m=64, split_tail=True, **_DR)),
}


def _lower_gemm(kind: str, cfg: MgpuConfig, m: int) -> None:
    """Lowers our GEMM of this kind with cfg at Llama-3-8B's N and K on 132 SMs."""
    n, k = {"plain": (6144, 4096), "silu": (14336, 4096), "residual": (4096, 4096),
            "residual_deep": (4096, 14336)}[kind]
    x, w = S((m, k), BF16), S((k, n), BF16)
    if kind == "silu":
        calls = lower_for_cuda(lambda a, b, c: gemm_mgpu(a, b, w_up=c, config=cfg, num_programs=132), x, w, w)
    elif kind.startswith("residual"):
        calls = lower_for_cuda(lambda a, b, r: gemm_mgpu(a, b, residual=r, config=cfg, num_programs=132),
                               x, w, S((m, n), BF16))
    else:
        calls = lower_for_cuda(lambda a, b: gemm_mgpu(a, b, config=cfg, num_programs=132), x, w)
    assert calls & {"mosaic_gpu", "mosaic_gpu_v2"}


@pytest.mark.parametrize("kind,cfg,m", list(_tuned_cases()))
def test_tuned_gemm_configs_lower_for_cuda(kind, cfg: MgpuConfig, m):
    """Each tuned row fits the H100/H200 shared memory and lowers (CTA pairs, chained
    tiles, split K and split tails included) on the shapes it was chosen for."""
    _lower_gemm(kind, cfg, m)


@pytest.mark.parametrize("kind,m,cfg", list(FEATURE_CONFIGS.values()), ids=list(FEATURE_CONFIGS))
def test_gemm_launch_features_lower_for_cuda(kind, m, cfg: MgpuConfig):
    """A configuration a GPU would refuse costs device time; refuse it here."""
    _lower_gemm(kind, cfg, m)


@pytest.mark.parametrize("kind", ["silu", "residual", "residual_deep"])
def test_stacked_weight_gemms_lower_for_cuda(kind):
    """The GEMMs a nanoflow step runs on stacked [L, K, N] weights at a traced layer, with
    the tuned row of each kind at M = 256 (residual_deep's splits K)."""
    n, k = {"silu": (14336, 4096), "residual": (4096, 4096), "residual_deep": (4096, 14336)}[kind]
    x, w, r, i = S((256, k), BF16), S((32, k, n), BF16), S((256, n), BF16), S((), jnp.int32)
    if kind == "silu":
        calls = lower_for_cuda(lambda a, b, c, l: gemm_mgpu(a, b, w_up=c, layer=l, num_programs=132), x, w, w, i)
    else:
        calls = lower_for_cuda(lambda a, b, c, l: gemm_mgpu(a, b, residual=c, layer=l, num_programs=132), x, w, r, i)
    assert calls & {"mosaic_gpu", "mosaic_gpu_v2"}


def test_a_config_over_shared_memory_is_refused_on_cpu():
    """The check is real: 9 stages of 128x256x64 tiles need ~475 KB of shared memory."""
    with pytest.raises(ValueError, match="shared memory"):
        lower_for_cuda(lambda a, b: gemm_mgpu(a, b, config=MgpuConfig(stages=9), num_programs=132),
                       S((512, 1024), BF16), S((1024, 1024), BF16))


def test_memory_bound_and_attention_kernels_lower_for_cuda():
    t, n, w = 256, 64, 48
    pages = S((n * w + 1, PS, KV, D), BF16)
    cases = {
        "decode": (lambda q, k, v, bt, c: pk.paged_decode_attention(q, k, v, bt, c, scale=0.088),
                   (S((n, H, D), BF16), pages, pages, S((n, w), jnp.int32), S((n,), jnp.int32))),
        "prefill": (lambda q, k, v, seq, pos, bt, c: pk.paged_prefill_attention(q, k, v, seq, pos, bt, c, scale=0.088),
                    (S((t, H, D), BF16), pages, pages, S((t,), jnp.int32), S((t,), jnp.int32),
                     S((4, w), jnp.int32), S((4,), jnp.int32))),
        "rms_norm_res": (lambda x, r, g: pk.rms_norm(x, g, eps=1e-5, residual=r),
                         (S((t, 4096), BF16), S((t, 4096), BF16), S((4096,), BF16))),
        "rope_llama3": (lambda x, p: pk.apply_rope(x, p, theta=5e5, scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)), (S((t, H, D), BF16), S((t,), jnp.int32))),
        "write_kv_rope": (lambda kc, vc, k, v, s, p: pk.write_kv(kc, vc, k, v, s, rope_positions=p, rope_theta=5e5),
                          (pages, pages, S((t, KV, D), BF16), S((t, KV, D), BF16), S((t,), jnp.int32),
                           S((t,), jnp.int32))),
        "gather_pages": (lambda p, i: pk.gather_pages(p, i), (S((2, 64, PS, KV, D), BF16), S((8,), jnp.int32))),
    }
    one_split = lambda q, k, v, bt, c: pk.paged_decode_attention(q, k, v, bt, c, scale=0.088, num_splits=1)
    for g in (1, 3, 8):  # query heads per KV head: partials of G rows, of 16 (G = 3), of G
        cases[f"decode_g{g}"] = (cases["decode"][0], (S((n, g * KV, D), BF16),) + cases["decode"][1][1:])
        # One split: the kernel normalizes and stores the [N, H, D] output itself.
        cases[f"decode_one_split_g{g}"] = (one_split, cases[f"decode_g{g}"][1])
    # An fp8 (e4m3) cache: widened to bf16 as the attention kernels read it, saturated as it is written.
    fp8_pages = S(pages.shape, jnp.float8_e4m3fn)
    for name in ("decode", "prefill", "write_kv_rope"):
        fn, shapes = cases[name]
        cases[f"{name}_fp8_cache"] = (fn, tuple(fp8_pages if x is pages else x for x in shapes))
    # Horizontal fusion: a prefill-sized GEMM's tiles and decode attention in one launch.
    cases["gemm_beside_decode"] = (
        lambda x, w, q, k, v, bt, c: pk.horizontal.gemm_beside_decode_attention(
            x, w, q, k, v, bt, c, scale=0.088, gemm_programs=100, attention_programs=32),
        (S((t, 4096), BF16), S((4096, 14336), BF16)) + cases["decode"][1])
    for name, (fn, shapes) in cases.items():
        assert lower_for_cuda(fn, *shapes), name


@pytest.mark.parametrize("decode_only", [False, True])
def test_paged_forward_with_pallas_kernels_lowers_for_cuda(monkeypatch, decode_only):
    """The engine's whole step (forward_paged, Pallas kernel set, fused QKV, both the
    mixed and the decode-only variant) lowers for CUDA: the glue between the kernels too."""
    from nanoflow_jax.config import ModelConfig
    from nanoflow_jax.models.llama import forward_paged
    from nanoflow_jax.models.ops import PallasOps
    from nanoflow_jax.models.paged import BatchInputs, allocate_kv_cache
    from nanoflow_jax.models.params import fuse_qkv, init_params

    monkeypatch.setattr(PallasOps, "_interpret", property(lambda self: False))
    cfg = ModelConfig(architecture="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128)
    params = jax.eval_shape(lambda: fuse_qkv(init_params(cfg, jax.random.key(0), "bfloat16")))
    cache = jax.eval_shape(lambda: allocate_kv_cache(cfg, 257, PS, BF16))
    t, s, w = 128, 32, 16
    i32 = lambda *shape: S(shape, jnp.int32)  # noqa: E731
    batch = BatchInputs(token_ids=i32(t), positions=i32(t), slot_mapping=i32(t), token_seq=i32(t),
                        query_start=i32(s + 1), query_len=i32(s), context_len=i32(s), block_table=i32(s, w),
                        logits_index=i32(s), num_decode=i32(), decode_only=decode_only)
    calls = lower_for_cuda(lambda p, c, b: forward_paged(p, c, b, cfg, PallasOps()), params, cache, batch)
    assert calls >= {"__gpu$xla.gpu.triton"} and calls & {"mosaic_gpu", "mosaic_gpu_v2"}
