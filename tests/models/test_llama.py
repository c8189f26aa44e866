"""forward_dense against a float64 NumPy reference; forward_paged against forward_dense."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig, RopeScaling
from nanoflow_jax.models.llama import forward_dense, forward_paged
from nanoflow_jax.models.ops import get_ops
from nanoflow_jax.models.paged import allocate_kv_cache
from nanoflow_jax.models.params import fuse_qkv, init_params
from tests.models import numpy_reference
from tests.models.batching import pack_batch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rope_theta=500.0)
CONFIGS = {
    "llama": ModelConfig(architecture="llama", **TINY),
    "llama3-scaled": ModelConfig(architecture="llama", rope_scaling=RopeScaling(4.0, 1.0, 4.0, 32),
                                 **{**TINY, "rope_theta": 5e5}),
    "qwen2-bias-tied": ModelConfig(architecture="qwen2", attention_bias=True, tie_word_embeddings=True, **TINY),
}


def _seed():
    return int(np.random.SeedSequence().entropy % (2**31))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_matches_float64_numpy(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(_seed()))
    tokens = np.random.randint(0, cfg.vocab_size, size=40)
    got = np.asarray(forward_dense(params, jnp.asarray(tokens[None]), cfg)[0], np.float64)
    ref = numpy_reference.forward(jax.device_get(params), tokens, cfg)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-5, rel


def test_paged_chunked_mixed_batches_match_dense():
    """Three requests, prefilled in chunks and decoded together, pages shuffled, page size 4."""
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(_seed()))
    rng = np.random.default_rng(_seed())
    lens = [11, 5, 17]  # none a multiple of the page size
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in lens]
    ps, W = 4, 6
    pages = rng.permutation(np.arange(1, 40))  # page 0 is the null page
    tables = [pages[i * W:(i + 1) * W] for i in range(3)]
    cache = allocate_kv_cache(cfg, 40, ps)
    refs = [np.asarray(forward_dense(params, jnp.asarray(s[None]), cfg)[0]) for s in seqs]
    # Iteration plan (start, n) per request: chunked prefills then 1-token steps, mixed.
    plan = [[(0, 6), None, (0, 9)], [(6, 4), (0, 5), (9, 8)], [(10, 1), None, None]]
    for step in plan:
        reqs = [(seqs[i], *step[i], tables[i]) for i in range(3) if step[i] is not None]
        idx = [i for i in range(3) if step[i] is not None]
        logits, cache = forward_paged(params, cache, pack_batch(reqs, ps, T=32, S=4, W=W), cfg)
        for row, i in enumerate(idx):
            start, n = step[i]
            np.testing.assert_allclose(np.asarray(logits[row]), refs[i][start + n - 1], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_paged_ignores_nan_in_slots_past_the_context(kernels):
    """A request's pages past its context may hold anything (a freed page's old K/V, NaN
    from a request that overflowed): a 7-token prefill then a decode step, with every
    cache slot NaN beforehand, match the dense forward (the Pallas kernels interpreted)."""
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(_seed()))
    seq = np.random.default_rng(_seed()).integers(0, cfg.vocab_size, size=8)
    ps, table = 4, [3, 5, 6]
    cache = allocate_kv_cache(cfg, 8, ps)
    cache.k, cache.v = jnp.full_like(cache.k, jnp.nan), jnp.full_like(cache.v, jnp.nan)
    ref = np.asarray(forward_dense(params, jnp.asarray(seq[None]), cfg)[0])
    for start, n in ((0, 7), (7, 1)):
        batch = pack_batch([(seq, start, n, table)], ps, T=8, S=1, W=len(table))
        logits, cache = forward_paged(params, cache, batch, cfg, kernels=kernels)
        np.testing.assert_allclose(np.asarray(logits[0]), ref[start + n - 1], atol=2e-4, rtol=2e-4)


def test_paged_rejects_unknown_backend():
    cfg = CONFIGS["llama"]
    with pytest.raises(ValueError, match="kernels must be one of \\('auto', 'xla', 'pallas', 'hybrid'\\)"):
        forward_paged(init_params(cfg, jax.random.key(0)), allocate_kv_cache(cfg, 4, 4),
                      pack_batch([(np.arange(3), 0, 3, [1])], 4, 8, 1, 1), cfg, kernels="cuda")


def test_bfloat16_tracks_float32():
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(_seed()))
    tokens = jnp.asarray(np.random.randint(0, cfg.vocab_size, (2, 24)))
    ref = np.asarray(forward_dense(params, tokens, cfg))
    bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    got = np.asarray(forward_dense(bf, tokens, cfg))
    assert got.dtype == np.float32  # logits always come back in f32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel


@pytest.mark.parametrize("fuse_rope_kv", [False, True])
def test_pallas_kernels_match_xla_on_mixedpack_batch(fuse_rope_kv):
    """Decode rows (decode kernel) and a prefill chunk (prefill kernel) in one batch,
    interpreted on CPU; K rotated by the rope kernel or inside the cache write."""
    cfg = CONFIGS["qwen2-bias-tied"]
    params = init_params(cfg, jax.random.key(_seed()))
    rng = np.random.default_rng(_seed())
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in (9, 6, 20)]
    ps, W = 4, 6
    pages = rng.permutation(np.arange(1, 30))
    tables = [pages[i * W:(i + 1) * W] for i in range(3)]
    cache = allocate_kv_cache(cfg, 30, ps)
    _, cache = forward_paged(params, cache, pack_batch([(seqs[0], 0, 8, tables[0]), (seqs[1], 0, 5, tables[1]),
                                                    (seqs[2], 0, 7, tables[2])], ps, T=32, S=4, W=W), cfg)
    mixed = pack_batch([(seqs[0], 8, 1, tables[0]), (seqs[1], 5, 1, tables[1]), (seqs[2], 7, 13, tables[2])],
                   ps, T=16, S=4, W=W)
    assert int(mixed.num_decode) == 2
    ref_logits, ref_cache = forward_paged(params, cache, mixed, cfg, kernels="xla")
    got_logits, got_cache = forward_paged(params, cache, mixed, cfg,
                                          kernels=get_ops("pallas", fuse_rope_kv=fuse_rope_kv))
    np.testing.assert_allclose(np.asarray(got_logits)[:3], np.asarray(ref_logits)[:3], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(ref_cache.k), rtol=1e-5, atol=1e-5)


def test_decode_only_batch_skips_prefill_kernel_with_the_same_result():
    """A pure-decode batch flagged decode_only (the Pallas attention then launches only
    its decode kernel) gives the XLA reference's logits and cache, padding rows included."""
    cfg = CONFIGS["llama"]
    params = init_params(cfg, jax.random.key(_seed()))
    rng = np.random.default_rng(_seed())
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in (7, 12, 3)]
    ps, W = 4, 5
    tables = np.split(rng.permutation(np.arange(1, 16)), 3)
    cache = allocate_kv_cache(cfg, 16, ps)
    _, cache = forward_paged(params, cache, pack_batch([(s, 0, len(s) - 1, t) for s, t in zip(seqs, tables)],
                                                       ps, T=32, S=4, W=W), cfg)
    dec = pack_batch([(s, len(s) - 1, 1, t) for s, t in zip(seqs, tables)], ps, T=8, S=4, W=W)
    assert int(dec.num_decode) == 3
    ref_logits, ref_cache = forward_paged(params, cache, dec, cfg, kernels="xla")
    got_logits, got_cache = forward_paged(params, cache, dataclasses.replace(dec, decode_only=True), cfg,
                                          kernels="pallas")
    np.testing.assert_allclose(np.asarray(got_logits)[:3], np.asarray(ref_logits)[:3], rtol=2e-4, atol=2e-4)
    # Page 0 is the null page, the padding tokens' write sink: its contents are not data.
    np.testing.assert_allclose(np.asarray(got_cache.k)[:, 1:], np.asarray(ref_cache.k)[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
@pytest.mark.parametrize("name", ["llama", "qwen2-bias-tied"])
def test_fused_qkv_matches_separate_projections(name, kernels):
    """params.fuse_qkv (one [E, q + 2 kv] GEMM, biases concatenated) computes the same
    forward as the three projections, on the paged path with both kernel sets."""
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(_seed()))
    fused = fuse_qkv(params)
    assert "wqkv" in fused["layers"] and "wq" not in fused["layers"] and "wq" in params["layers"]
    assert ("bqkv" in fused["layers"]) == cfg.attention_bias
    rng = np.random.default_rng(_seed())
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in (9, 13)]
    batch = pack_batch([(seqs[0], 0, 9, np.arange(1, 4)), (seqs[1], 0, 13, np.arange(4, 8))], 4, T=32, S=4, W=4)
    cache = allocate_kv_cache(cfg, 9, 4)
    ref_logits, ref_cache = forward_paged(params, cache, batch, cfg, kernels=kernels)
    got_logits, got_cache = forward_paged(fused, cache, batch, cfg, kernels=kernels)
    np.testing.assert_allclose(np.asarray(got_logits)[:2], np.asarray(ref_logits)[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(ref_cache.k), rtol=1e-5, atol=1e-5)
    assert fuse_qkv(fused) is fused  # idempotent
