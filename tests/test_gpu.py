"""End-to-end checks that need an NVIDIA GPU (marker `gpu`; skipped on CPU machines).

Run on a GPU machine with: NANOFLOW_TEST_GPU=1 python -m pytest -m gpu
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.llama import forward_paged
from nanoflow_jax.models.paged import BatchInputs, allocate_kv_cache
from nanoflow_jax.models.params import init_params

pytestmark = pytest.mark.gpu


def test_default_model_answers_paris_in_bf16_on_gpu(default_gguf_path):
    from nanoflow_jax import LLM, SamplingParams

    llm = LLM(str(default_gguf_path), dtype="bfloat16", max_model_len=256, max_num_batched_tokens=256,
              num_kv_pages=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text


def _mixed_batch(rng, cfg, ps, n_dec, chunk, ctx):
    """n_dec decode rows with `ctx` cached tokens each, then one prefill chunk of `chunk` tokens."""
    S, W = n_dec + 1, (ctx + chunk) // ps + 2
    T = n_dec + chunk
    pages = rng.permutation(np.arange(1, S * W + 1)).reshape(S, W).astype(np.int32)
    pos = np.concatenate([np.full(n_dec, ctx), np.arange(ctx, ctx + chunk)]).astype(np.int32)
    seq = np.concatenate([np.arange(n_dec), np.full(chunk, n_dec)]).astype(np.int32)
    slots = pages[seq, pos // ps] * ps + pos % ps
    qs = np.concatenate([np.arange(n_dec + 1), [T]]).astype(np.int32)
    return BatchInputs(
        token_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, T), jnp.int32), positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(slots), token_seq=jnp.asarray(seq), query_start=jnp.asarray(qs),
        query_len=jnp.asarray(np.diff(qs)), context_len=jnp.asarray(pos[qs[1:] - 1] + 1),
        block_table=jnp.asarray(pages), logits_index=jnp.asarray(qs[1:] - 1),
        num_decode=jnp.asarray(n_dec, jnp.int32)), S * W + 1


GPU_CONFIGS = {
    "llama-like": ModelConfig(architecture="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                              num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128),
    # SmolLM2's unaligned sizes (576, 1536, 9 heads over 3): the default model's kernel path.
    "smollm2-shapes": ModelConfig(architecture="llama", vocab_size=4096, hidden_size=576, intermediate_size=1536,
                                  num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
}


@pytest.mark.parametrize("kernels", ["pallas", "hybrid"])
@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_pallas_forward_matches_xla_on_gpu(name, kernels):
    cfg = GPU_CONFIGS[name]
    rng = np.random.default_rng()
    params = init_params(cfg, jax.random.key(int(rng.integers(1 << 30))), "bfloat16")
    batch, pages = _mixed_batch(rng, cfg, ps=16, n_dec=60, chunk=196, ctx=300)
    cache = allocate_kv_cache(cfg, pages, 16, jnp.bfloat16)
    cache.k = jax.random.normal(jax.random.key(1), cache.k.shape, jnp.bfloat16)
    cache.v = jax.random.normal(jax.random.key(2), cache.v.shape, jnp.bfloat16)
    ref, _ = jax.jit(forward_paged, static_argnames=("cfg", "kernels"))(params, cache, batch, cfg, "xla")
    got, _ = jax.jit(forward_paged, static_argnames=("cfg", "kernels"))(params, cache, batch, cfg, kernels)
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 2e-2, rel


@pytest.mark.parametrize("extra", [{}, {"wg_split": "m", "tile_m": 64, "delay_release": 1},
                                   {"chain_tiles": True}, {"k_splits": 2, "stages": 3}, {"silu": True},
                                   {"axis": "n"}, {"axis": "n", "wg_split": "m", "tile_m": 64, "tile_n": 64,
                                                   "stages": 8, "delay_release": 1}])
def test_mosaic_gemm_cta_pairs_multicast_on_gpu(extra):
    """cluster_m=2 / cluster_n=2 with real TMA multicast (the CPU interpreter runs pairs
    without it): every budget from 2 SMs up to the full GPU, on fresh random inputs."""
    from pallas_kernels import reference as ref
    from pallas_kernels.gemm_config import MgpuConfig
    from pallas_kernels.gemm_mgpu import gemm_mgpu

    extra = dict(extra)
    silu = extra.pop("silu", False)
    pair = {f"cluster_{extra.pop('axis', 'm')}": 2}
    cfg = MgpuConfig(**{"tile_m": 128, "tile_n": 64 if silu else 128, "stages": 4, **extra}, **pair)
    keys = jax.random.split(jax.random.key(np.random.default_rng().integers(1 << 30)), 4)
    x = jax.random.normal(keys[0], (512, 1024), jnp.bfloat16)
    w, w2 = (jax.random.normal(k, (1024, 1024), jnp.bfloat16) / 32 for k in keys[1:3])
    r = jax.random.normal(keys[3], (512, 1024), jnp.bfloat16)
    for programs in (2, 7, 132):
        if silu:
            got, want = gemm_mgpu(x, w, w_up=w2, num_programs=programs, config=cfg), ref.gemm_silu_mul(x, w, w2)
        else:
            got, want = gemm_mgpu(x, w, residual=r, num_programs=programs, config=cfg), ref.gemm(x, w, residual=r)
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2, (programs, cfg)


@pytest.mark.parametrize("op", ["silu", "residual", "bias_pairs"])
def test_split_tail_gemm_matches_reference_on_gpu(op):
    """The last partial wave's columns in half-width tiles (a second pipeline, which the
    CPU interpreter cannot run): against the f32 reference, on shapes that do split."""
    from pallas_kernels import reference as ref
    from pallas_kernels.gemm_config import MgpuConfig
    from pallas_kernels.gemm_mgpu import gemm_mgpu, tail_tiles

    cfg = {"silu": MgpuConfig(tile_m=64, tile_n=128, stages=4, wg_split="m", chain_tiles=True, split_tail=True),
           "residual": MgpuConfig(tile_m=128, tile_n=128, stages=3, split_tail=True),
           "bias_pairs": MgpuConfig(tile_m=64, tile_n=128, stages=4, delay_release=1, wg_split="m",
                                    cluster_m=2, split_tail=True)}[op]
    m, n, k, programs = 500, 14336 if op == "silu" else 5 * cfg.cta_n, 1024, 132 if op == "silu" else 16
    assert tail_tiles(-(-m // cfg.cta_m), n // cfg.cta_n, programs) > 0  # the tail pass runs
    ks = jax.random.split(jax.random.key(np.random.default_rng().integers(1 << 30)), 4)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w, extra = (jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.05 for kk in ks[1:3])
    if op == "silu":
        out, want = gemm_mgpu(x, w, w_up=extra, config=cfg, num_programs=programs), ref.gemm_silu_mul(x, w, extra)
    elif op == "residual":
        r = jax.random.normal(ks[3], (m, n), jnp.bfloat16)
        out, want = gemm_mgpu(x, w, residual=r, config=cfg, num_programs=programs), ref.gemm(x, w, residual=r)
    else:
        b = jax.random.normal(ks[3], (n,), jnp.bfloat16)
        out, want = gemm_mgpu(x, w, bias=b, config=cfg, num_programs=programs), ref.gemm(x, w, bias=b)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    assert np.linalg.norm(f32(out) - f32(want)) / np.linalg.norm(f32(want)) < 1e-2


def test_profiled_windows_attribute_every_kernel_on_gpu(tmp_path):
    """bench.throughput --profile-steps on a small model: each traced window is cut into as many
    iterations as were dispatched, and every GPU kernel lands in exactly one operation."""
    import json

    from bench import throughput

    out = tmp_path / "r.json"
    assert throughput.main(["--model", "smollm2-135m", "--weights", "random", "--dtype", "bfloat16",
                            "--kernels", "pallas", "--num-prompts", "24", "--input-len", "96", "--output-len", "24",
                            "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--num-kv-pages", "512",
                            "--token-buckets", "16,256", "--profile-steps", "2:4,20:4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    prof = r["iteration_profile"]
    assert prof["measured"], prof
    for w in prof["windows"]:
        assert w["measured"], w.get("note")
        assert w["window"]["iterations"] == len(w["steps"]) == w["count"]
        for row in w["representative"].values():
            assert sum(op["kernels"] for op in row["ops"].values()) == row["kernels"]
    assert 0 <= r["device_idle"]["share"] < 1 and r["floor"]["sequential_s"] > 0


def test_offload_copies_run_inside_the_step_and_reload_bit_for_bit_on_gpu():
    """The staging ring on a real device: the compiled step sends its window to pinned host
    memory as an async copy of its own program (copy-start into memory space S(5)), and an
    engine that offloads, evicts and reloads every conversation serves the greedy tokens of
    the dense reference."""
    from nanoflow_jax import SamplingParams
    from tests.engine.conftest import make_llm, random_prompts, reference_greedy

    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    convs = random_prompts(4, [36, 44, 40, 24], seed=int(np.random.default_rng().integers(1 << 30)))
    with jax.default_matmul_precision("highest"):   # float32 as on CPU (no TF32): exact greedy ties
        llm = make_llm(kernels="xla", precompile=True, kv_offload_host_gb=0.01, kv_offload_pages_per_step=4)
        eng = llm.engine
        assert eng.offload.ring is not None
        if jax.default_backend() == "gpu":
            texts = [exe.as_text() for exe in eng.runner._compiled.values()]
            assert texts and all("copy-start" in t and "S(5)" in t for t in texts)
        want = reference_greedy(convs, greedy.max_tokens)
        assert [o.outputs[0].token_ids for o in llm.generate(convs, greedy)] == want
        for p in random_prompts(4, [56] * 4, seed=99):     # the whole pool: every cached page leaves the device
            llm.generate([p], greedy)
        assert [o.outputs[0].token_ids for o in llm.generate(convs, greedy)] == want
    stats = eng.offload.stats
    assert stats.loaded_pages == sum((len(c) - 1) // 4 for c in convs) and stats.saved_pages > stats.direct_pages
    assert eng.blocks.all_free()
