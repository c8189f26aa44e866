"""Where a decode step's time goes: the whole step vs the sum of its ops, timed alone.

    python -m bench.step_profile --out step_profile.json [--model llama-3-8b] [--rows 128] [--ctx 640]

One decode iteration (every row one new token after `ctx` cached ones) of forward_paged
with the given kernel set, timed as a chain of steps with the cache donated (as the
engine runs it); then each op of one layer timed alone on the same shapes (bench.timing.device_ms,
weights rotated over successive layers so they come from HBM as in the step) and
multiplied by the layer count. The gap between the two is launch gaps, glue ops
(reshapes, the embedding gather, the LM head, the sampler's inputs) and what the ops
lose when run back to back. `--smoke`: a tiny config on CPU with the XLA ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import run_metadata
from bench.timing import cold_copies, device_ms
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.models.llama import forward_paged, lm_head
from nanoflow_jax.models.ops import XlaOps, get_ops
from nanoflow_jax.models.paged import BatchInputs, allocate_kv_cache
from nanoflow_jax.models.params import fuse_qkv, init_params

PAGE = 16


def decode_batch(cfg: ModelConfig, rows: int, ctx: int, rng: np.random.Generator,
                 decode_only: bool = False) -> tuple[BatchInputs, int]:
    """`rows` decode rows at position `ctx`, each with its own shuffled pages."""
    width = ctx // PAGE + 1
    pages = rng.permutation(np.arange(1, rows * width + 1)).reshape(rows, width).astype(np.int32)
    pos = np.full(rows, ctx, np.int32)
    idx = np.arange(rows, dtype=np.int32)
    batch = BatchInputs(
        token_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, rows), jnp.int32), positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(pages[idx, pos // PAGE] * PAGE + pos % PAGE), token_seq=jnp.asarray(idx),
        query_start=jnp.arange(rows + 1, dtype=jnp.int32), query_len=jnp.ones(rows, jnp.int32),
        context_len=jnp.full(rows, ctx + 1, jnp.int32), block_table=jnp.asarray(pages),
        logits_index=jnp.asarray(idx), num_decode=jnp.asarray(rows, jnp.int32),
        decode_only=decode_only)
    return batch, rows * width + 1


def step_ms(params: Any, cache: Any, batch: BatchInputs, cfg: ModelConfig, kernels: str | XlaOps,
            steps: int) -> float:
    """ms per decode step, cache donated and threaded through `steps` back-to-back calls."""
    fwd = jax.jit(lambda p, c, b: forward_paged(p, c, b, cfg, kernels), donate_argnums=(1,))
    logits, cache = fwd(params, cache, batch)
    jax.block_until_ready(logits)
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = fwd(params, cache, batch)
        jax.block_until_ready(logits)
        samples.append((time.perf_counter() - t0) * 1e3 / steps)
    return float(np.median(samples))


def layer_ops(cfg: ModelConfig, kernels: str, params: Any, cache: Any,
              batch: BatchInputs) -> dict[str, tuple[Callable, tuple, tuple[int, ...]]]:
    """One layer's ops on the step's shapes: name -> (fn, args, rotated argument positions),
    as forward_paged calls them. Weights are tuples of successive layers' matrices, enough
    to exceed L2 together (bench.cold_copies), which the timing chain rotates through as
    the model does; a single layer's 8-32 MB matrix would stay in the 60 MB L2."""
    ops, fused = get_ops(kernels), get_ops(kernels, fuse_rope_kv=True)
    stacked = params["layers"]

    def per_layer(*names: str) -> tuple[jax.Array, ...]:
        n = min(cfg.num_layers, cold_copies(sum(stacked[k][0].nbytes for k in names)))
        return tuple(jnp.concatenate([stacked[k][i] for k in names], -1) if len(names) > 1
                     else stacked[names[0]][i] for i in range(n))

    lp = jax.tree.map(lambda a: a[0], stacked)
    rows, e = batch.token_ids.shape[0], cfg.hidden_size
    key = jax.random.key(0)
    x = jax.random.normal(key, (rows, e), jnp.float32).astype(cache.k.dtype)
    q = jax.random.normal(key, (rows, cfg.num_heads, cfg.head_dim), jnp.float32).astype(x.dtype)
    kv = jax.random.normal(key, (rows, cfg.num_kv_heads, cfg.head_dim), jnp.float32).astype(x.dtype)
    attn = q.reshape(rows, cfg.q_size)
    act = jax.random.normal(key, (rows, cfg.intermediate_size), jnp.float32).astype(x.dtype)
    layer = jnp.int32(0)
    # write_kv is timed on a small one-layer cache: its cost does not depend on the cache
    # size, and the timing chain (not donated) would otherwise copy the whole cache.
    small = allocate_kv_cache(dataclasses.replace(cfg, num_layers=1), rows // PAGE + 2, PAGE, x.dtype)
    slots = PAGE + jnp.arange(rows, dtype=jnp.int32)
    linear = lambda a, w: ops.linear(a, w)  # noqa: E731
    linear_res = lambda a, w, r: ops.linear(a, w, residual=r)  # noqa: E731
    return {
        "rms_norm": (lambda a, w: ops.rms_norm(a, w, cfg.rms_norm_eps), (x, lp["attn_norm"]), ()),
        "q_proj": (linear, (x, per_layer("wq")), (1,)),
        "k_proj": (linear, (x, per_layer("wk")), (1,)),
        "v_proj": (linear, (x, per_layer("wv")), (1,)),
        "qkv_fused": (linear, (x, per_layer("wq", "wk", "wv")), (1,)),  # EngineConfig.fuse_qkv
        "rope_q": (lambda a, p: ops.rope(a, p, cfg), (q, batch.positions), ()),
        "rope_k": (lambda a, p: ops.rope(a, p, cfg), (kv, batch.positions), ()),
        "write_kv": (lambda kc, vc, a: ops.write_kv(kc, vc, layer, a, a, slots), (small.k, small.v, kv), ()),
        # EngineConfig.fuse_rope_kv: rope_k + write_kv in one kernel
        "write_kv_rope": (lambda kc, vc, a: fused.write_kv_rope(kc, vc, layer, a, a, slots, batch.positions, cfg),
                          (small.k, small.v, kv), ()),
        "attention": (lambda a, kc, vc: ops.attention(a, kc, vc, layer, batch, cfg), (q, cache.k, cache.v), ()),
        "o_proj_residual": (linear_res, (attn, per_layer("wo"), x), (1,)),
        "rms_norm_mlp": (lambda a, w: ops.rms_norm(a, w, cfg.rms_norm_eps), (x, lp["mlp_norm"]), ()),
        "gate_up_silu": (lambda a, g, u: ops.gate_up(a, g, u), (x, per_layer("w_gate"), per_layer("w_up")), (1, 2)),
        "down_residual": (linear_res, (act, per_layer("w_down"), x), (1,)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="step_profile.json")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--kernels", default="pallas")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fuse-qkv", type=int, choices=[0, 1], default=int(EngineConfig().fuse_qkv),
                    help="one QKV GEMM as the engine runs it by default (0: three)")
    ap.add_argument("--fuse-rope-kv", type=int, choices=[0, 1], default=int(EngineConfig().fuse_rope_kv),
                    help="K's RoPE inside the cache write, as EngineConfig.fuse_rope_kv")
    ap.add_argument("--decode-only", type=int, choices=[0, 1], default=int(EngineConfig().decode_only_steps),
                    help="the decode-only step (no prefill attention kernel), as EngineConfig.decode_only_steps")
    ap.add_argument("--smoke", action="store_true", help="tiny model, XLA ops, CPU")
    a = ap.parse_args(argv)
    if a.smoke:
        cfg = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
        a.kernels, a.rows, a.ctx, a.steps, dtype = "xla", 4, 40, 2, "float32"
    else:
        cfg, dtype = ModelConfig.from_name(a.model), "bfloat16"
    rng = np.random.default_rng(int(time.time()))
    res: dict[str, Any] = {"meta": run_metadata("bench.step_profile"), "model": a.model, "kernels": a.kernels,
                           "rows": a.rows, "ctx": a.ctx, "fuse_qkv": bool(a.fuse_qkv),
                           "fuse_rope_kv": bool(a.fuse_rope_kv), "decode_only": bool(a.decode_only)}
    params = init_params(cfg, jax.random.key(1), dtype)
    batch, pages = decode_batch(cfg, a.rows, a.ctx, rng, bool(a.decode_only))
    cache = allocate_kv_cache(cfg, pages, PAGE, jnp.dtype(dtype))
    res["ops_ms_per_layer"] = {}
    for name, (fn, args, rotate) in layer_ops(cfg, a.kernels, params, cache, batch).items():
        thread = 2 if name.startswith("write_kv") else 0
        res["ops_ms_per_layer"][name] = device_ms(fn, *args, reps=2 if a.smoke else 10, thread=thread,
                                                  repeats=1 if a.smoke else 3, rotate=rotate)
        print(name, f"{res['ops_ms_per_layer'][name] * 1e3:.1f} us", flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    x = jax.random.normal(jax.random.key(2), (a.rows, cfg.hidden_size), jnp.float32).astype(dtype)
    res["lm_head_ms"] = device_ms(lambda h, p: lm_head(p, h, cfg), x, params, reps=2 if a.smoke else 10,
                                  repeats=1 if a.smoke else 3)
    unused = ({"q_proj", "k_proj", "v_proj"} if a.fuse_qkv else {"qkv_fused"}) | \
        ({"rope_k", "write_kv"} if a.fuse_rope_kv else {"write_kv_rope"})
    per_layer = sum(v for k, v in res["ops_ms_per_layer"].items() if k not in unused)
    res["sum_of_ops_ms"] = cfg.num_layers * per_layer + res["lm_head_ms"]
    res["step_ms"] = step_ms(fuse_qkv(params) if a.fuse_qkv else params, cache, batch, cfg,
                             get_ops(a.kernels, fuse_rope_kv=bool(a.fuse_rope_kv)), a.steps)
    print(f"step {res['step_ms']:.2f} ms, sum of ops {res['sum_of_ops_ms']:.2f} ms", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
