"""Owns the device state (parameters, KV page pool) and the compiled iteration steps.

Two jitted functions per iteration, dispatched back to back without waiting: the forward
(gather decode inputs from the previous iteration's sampled tokens, then the configured
pipeline, `models.nanobatch.forward_pipeline`, with the cache donated so it is updated in
place), then the sampler (`sample_step`) of the batch's `SamplerPlan`. Batches are padded
to a small fixed set of shape buckets (T tokens, S = min(T, max_num_seqs) rows, W
block-table columns), all compiled at start-up with the greedy and drawing samplers
(several at once, `engine.compiler`; a warm start loads them whole from
`engine.executable_store`), so steady serving never compiles. Host inputs travel
as few packed arrays because every argument of a jitted call costs dispatch time; the
penalty inputs go only to a sampler whose plan has penalties.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import env
from nanoflow_jax.autosearch import resolve_pipeline
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine import compiler
from nanoflow_jax.engine import param_update
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.executable_store import ExecutableStore, run_fingerprint
from nanoflow_jax.engine.kv_offload import device_bytes, host_sharding
from nanoflow_jax.engine.kv_pool import resolve_num_pages
from nanoflow_jax.engine.kv_stage import Send, send_window, stage_spec, stage_struct
from nanoflow_jax.engine.sample_step import plan_for, sample_step
from nanoflow_jax.engine.sampler import DRAW, GREEDY, SamplerPlan, token_logprobs
from nanoflow_jax.engine.scheduler import ScheduledBatch
from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.models.nanobatch import forward_pipeline
from nanoflow_jax.models.ops import PallasOps, XlaOps, get_ops, programs_key
from nanoflow_jax.models.streams import step_compiler_options
from nanoflow_jax.models.paged import NULL_PAGE, BatchInputs, KVCache, allocate_kv_cache, kv_bytes_per_page, \
    kv_cache_dtype
from nanoflow_jax.models.params import fuse_qkv
from nanoflow_jax.parallel.forward import sharded_forward
from nanoflow_jax.parallel.sharding import TensorParallel

log = logging.getLogger(__name__)

TOK_FIELDS = 5   # token_ids, positions, slot_mapping, token_seq, gather_row
SEQ_INT_FIELDS = 6   # query_len, context_len, logits_index, top_k, seed, gen_index
SEQ_FLOAT_FIELDS = 6  # temperature, top_p, min_p, presence, frequency, repetition penalties
PEN_FIELDS = 3        # [S, max_model_len] each: token history, logit-bias ids, bias values (f32 bits)


def _bucket_label(key: tuple[int, int, bool]) -> str:
    t, w, decode_only = key
    return f"T={t} W={w}" + (" decode" if decode_only else "")


def _is_sampler(key: tuple) -> bool:
    return len(key) == 2   # (S, SamplerPlan); a forward bucket is (T, W, decode_only)


def _job_label(key: tuple) -> str:
    return f"sampler S={key[0]} {key[1]}" if _is_sampler(key) else _bucket_label(key)


def unpack_batch(tok: Any, seq_i: Any, query_start: Any, block_table: Any, num_decode: Any,
                 token_ids: Any = None, decode_only: bool = False) -> BatchInputs:
    """`BatchInputs` from the packed arrays of `ModelRunner.prepare` (token_ids may be replaced)."""
    return BatchInputs(token_ids=tok[0] if token_ids is None else token_ids, positions=tok[1],
                       slot_mapping=tok[2], token_seq=tok[3], query_start=query_start, query_len=seq_i[0],
                       context_len=seq_i[1], block_table=block_table, logits_index=seq_i[2],
                       num_decode=num_decode, decode_only=decode_only)


def _step(params: Any, cache: KVCache, tok: jax.Array, seq_i: jax.Array, query_start: jax.Array,
          block_table: jax.Array, num_decode: jax.Array, prev_tokens: jax.Array, stage: jax.Array | None = None,
          window: jax.Array | None = None, *, cfg: ModelConfig, kernels: str | XlaOps, decode_only: bool = False,
          pipeline: str = "sequential", nano_programs: Any = ((), ()), tp: TensorParallel | None = None,
          send_pages: int = 0) -> tuple[jax.Array, ...]:
    """The forward of one batch -> (logits [S, V] f32, the updated cache, each row's last
    input token [S]); `sample_step` takes it from there. With the offload ring (`send_pages`
    > 0) also window `window` of `stage` in pinned host memory (`kv_stage`)."""
    # Decode rows whose input was sampled by the in-flight iteration read it here, on the
    # device: the host formed this batch before that token existed on the host.
    gather = tok[4]
    token_ids = jnp.where(gather >= 0, prev_tokens[jnp.maximum(gather, 0)], tok[0])
    batch = unpack_batch(tok, seq_i, query_start, block_table, num_decode, token_ids, decode_only)
    if tp is None:
        logits, cache = forward_pipeline(params, cache, batch, cfg, kernels, pipeline, nano_programs)
    else:
        logits, cache = sharded_forward(tp, params, cache, batch, cfg, kernels, pipeline, nano_programs)
    if send_pages:
        sent = send_window(stage, window, send_pages, host_sharding())
        return logits, cache, batch.token_ids[batch.logits_index], sent
    return logits, cache, batch.token_ids[batch.logits_index]


def _score(params: Any, tokens: jax.Array, targets: jax.Array, *, cfg: ModelConfig,
           num_logprobs: int) -> tuple[jax.Array, jax.Array]:
    """Logprobs of `targets` (each prompt token's successor) under a dense causal forward."""
    logits = forward_dense(params, tokens[None], cfg)[0]
    return token_logprobs(logits, targets, num_logprobs)


def enable_compilation_cache(path: str | None) -> None:
    """Turn on JAX's persistent compilation cache unless the user already chose a folder.

    `path` None: `env.compilation_cache_dir()` ($NANOFLOW_COMPILATION_CACHE, else the xla/
    folder of $NANOFLOW_JAX_CACHE)."""
    if jax.config.jax_compilation_cache_dir:
        return
    folder = os.path.expanduser(path) if path else str(env.compilation_cache_dir())
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class ModelRunner:
    def __init__(self, params: Any, model_cfg: ModelConfig, cfg: EngineConfig) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self._param_spec = param_update.param_spec(params)   # what update_params must match
        # Tensor parallelism: the parameters split over a mesh (nanoflow_jax/parallel/).
        self.tp = (TensorParallel.create(model_cfg, cfg.tensor_parallel_size)
                   if cfg.tensor_parallel_size > 1 else None)
        if self.tp is None:
            self._layout = fuse_qkv if cfg.fuse_qkv else (lambda p: p)
        else:
            self._layout = lambda p: self.tp.shard_params(p, fuse_qkv=cfg.fuse_qkv)
        self._relayout = param_update.relayout_fn(self._layout)
        self.params = self._layout(params)
        enable_compilation_cache(cfg.compilation_cache_dir)
        self.kv_dtype = kv_cache_dtype(cfg.kv_cache_dtype, jax.tree_util.tree_leaves(params)[0].dtype)
        on_cpu = jax.default_backend() == "cpu"
        self.ops = get_ops(cfg.kernels, fuse_rope_kv=cfg.fuse_rope_kv)  # hashable: a static argument
        # XLA's paged attention gathers every token's pages, so a lone decode padded to 16
        # tokens costs 16x: on CPU small T buckets, each compiled when first needed.
        self.precompile = cfg.precompile if cfg.precompile is not None else not on_cpu
        small = on_cpu and not isinstance(self.ops, PallasOps) and not self.precompile
        self.token_buckets = cfg.resolved_token_buckets(small=small)
        self.width_buckets = cfg.resolved_width_buckets()
        self._jitted = jax.jit(_step, donate_argnums=(1,), static_argnames=(
            "cfg", "kernels", "decode_only", "pipeline", "nano_programs", "tp", "send_pages"))
        self.num_logprobs = min(cfg.max_logprobs, model_cfg.vocab_size)
        self._sampler = jax.jit(sample_step, static_argnames=("plan", "num_logprobs", "max_num_seqs", "tp"))
        self._samplers: dict[tuple[int, SamplerPlan], Any] = {}   # (S, plan) -> compiled sample_step
        self._score = jax.jit(_score, static_argnames=("cfg", "num_logprobs"))
        # `auto` becomes the searched mode (and its SM budgets, unless given) for this model and GPU.
        self.pipeline, searched = resolve_pipeline(cfg.pipeline, cfg.nano_programs, model_cfg)
        self.nano_programs = tuple(programs_key(p) for p in (cfg.nano_programs or searched or ({}, {})))
        # Pure-decode batches get their own step where that changes the kernels launched
        # (the Pallas attention skips its prefill kernel); the XLA attention is one path.
        self.decode_only_steps = cfg.decode_only_steps and isinstance(self.ops, PallasOps)
        # The offload tiers' staging ring (kv_stage), whose windows each step sends to host memory.
        page_bytes = kv_bytes_per_page(model_cfg, cfg.block_size, self.kv_dtype)
        # On CPU the device's memory is the host's: no ring by default (a window a step would
        # be a memcpy for nothing), the direct gather copies exactly the pages saved.
        per_step = cfg.kv_offload_pages_per_step
        per_step = 0 if per_step is None and on_cpu else per_step
        self.stage_spec = (stage_spec(per_step, page_bytes)
                           if cfg.kv_offload_host_gb > 0 and self.tp is None else None)
        reserved = self.stage_spec.slots * page_bytes if self.stage_spec is not None else 0
        if cfg.kv_offload_host_gb > 0:   # uploads ahead of admission, a save's gather, a reload
            reserved += device_bytes(page_bytes)
        # Per-device page bytes and memory: one device's share of the pool under TP.
        self.num_pages = resolve_num_pages(cfg, model_cfg if self.tp is None else self.tp.local_config,
                                           self.kv_dtype, self._step_temp_bytes, reserved)
        if self.tp is None:
            self.cache = allocate_kv_cache(model_cfg, self.num_pages, cfg.block_size, self.kv_dtype)
        else:
            self.cache = self.tp.allocate_kv_cache(self.num_pages, cfg.block_size, self.kv_dtype)
        self._zero_tokens = jax.device_put(np.zeros(cfg.max_num_seqs, np.int32),
                                           None if self.tp is None else self.tp.replicated)
        self._compiled: dict[tuple[int, int, bool], Any] = {}
        self.store = self._executable_store()
        if self.precompile:
            self.compile_all()

    def _executable_store(self) -> ExecutableStore | None:
        """Compiled steps on disk in the compilation cache folder (`EngineConfig.
        compilation_cache_dir`, else JAX's); not under tensor parallelism, whose executables
        span a mesh (`EngineConfig.cache_executables`)."""
        folder = os.path.expanduser(self.cfg.compilation_cache_dir or jax.config.jax_compilation_cache_dir or "")
        wanted = self.cfg.cache_executables
        if wanted is None:
            wanted = jax.default_backend() != "cpu"
        if not wanted or self.tp is not None or not folder:
            return None
        fingerprint = run_fingerprint(
            model_cfg=self.model_cfg, engine_cfg=self.cfg, params=self.params, cache=self.cache,
            extra=(self.ops, self.pipeline, self.nano_programs, step_compiler_options(self.pipeline)))
        devices = sorted(jax.tree_util.tree_leaves(self.params)[0].sharding.device_set, key=lambda d: d.id)
        return ExecutableStore(os.path.join(folder, "nanoflow_executables"), fingerprint, devices=devices)

    def _load_stored(self, key: tuple) -> bool:
        """Takes `key`'s executable (a bucket or a sampler) from the store, if it is there."""
        compiled = self.store.load(key) if self.store is not None else None
        if compiled is not None:
            (self._samplers if _is_sampler(key) else self._compiled)[key] = compiled
        return compiled is not None

    def _keep(self, key: tuple, compiled: Any) -> Any:
        """Records a fresh compile (a bucket or a sampler) and writes it to the store."""
        (self._samplers if _is_sampler(key) else self._compiled)[key] = compiled
        if self.store is not None:
            self.store.store(key, compiled)
        return compiled

    def _shapes(self, t: int, w: int) -> tuple[jax.ShapeDtypeStruct, ...]:
        s = self.cfg.seqs_for(t)
        i32, f32 = jnp.int32, jnp.float32
        # Under TP the host arrays go to every device of the mesh.
        sharding = None if self.tp is None else self.tp.replicated
        shapes = (((TOK_FIELDS, t), i32), ((SEQ_INT_FIELDS, s), i32), ((s + 1,), i32), ((s, w), i32), ((), i32),
                  ((self.cfg.max_num_seqs,), i32))
        return tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes)

    def _lower(self, cache: Any, t: int, w: int, decode_only: bool = False) -> Any:
        send = ()
        if self.stage_spec is not None:
            send = (stage_struct(self.stage_spec, cache), jax.ShapeDtypeStruct((), jnp.int32))
        return self._jitted.lower(self.params, cache, *self._shapes(t, w), *send, cfg=self.model_cfg,
                                  kernels=self.ops, decode_only=decode_only, pipeline=self.pipeline,
                                  nano_programs=self.nano_programs, tp=self.tp,
                                  send_pages=self.stage_spec.window if send else 0)

    def _step_temp_bytes(self, pool_sizes: Sequence[int]) -> list[int]:
        """Scratch memory of the largest bucket's step with each pool size (in pages)."""
        t, w = self.token_buckets[-1], self.width_buckets[-1]

        def lower(num_pages: int) -> Any:
            if self.tp is not None:
                return self._lower(self.tp.cache_struct(num_pages, self.cfg.block_size, self.kv_dtype), t, w)
            shape = (self.model_cfg.num_layers, num_pages, self.cfg.block_size, self.model_cfg.num_kv_heads,
                     self.model_cfg.head_dim)
            probe = KVCache(k=jax.ShapeDtypeStruct(shape, self.kv_dtype),
                            v=jax.ShapeDtypeStruct(shape, self.kv_dtype))
            return self._lower(probe, t, w)

        compiled = compiler.compile_all(
            pool_sizes, lower, step_compiler_options(self.pipeline),
            compiler.resolve_workers(self.cfg.compile_workers, len(pool_sizes)),
            label=lambda n: f"T={t} W={w} with a pool of {n} KV pages (memory probe)")
        return [int(getattr(compiled[n].memory_analysis(), "temp_size_in_bytes", 0) or 0) for n in pool_sizes]

    def bucket_keys(self) -> list[tuple[int, int, bool]]:
        """Every (T, W, decode_only) step that serving can dispatch."""
        keys = [(t, w, False) for t in self.token_buckets for w in self.width_buckets]
        if self.decode_only_steps:  # a pure-decode batch has at most max_num_seqs tokens
            top = next((b for b in self.token_buckets if b >= self.cfg.max_num_seqs), self.token_buckets[-1])
            keys += [(t, w, True) for t, w, _ in keys if t <= top]
        return keys

    def compile_jobs(self) -> list[tuple]:
        """What start-up compiles: every forward bucket, then the samplers of the two common
        plans (all greedy; some row drawing) for every S. Penalties and log-probabilities
        compile their samplers when first asked for."""
        samplers = [(s, plan) for s in sorted({self.cfg.seqs_for(t) for t in self.token_buckets})
                    for plan in (GREEDY, DRAW)]
        return [*self.bucket_keys(), *samplers]

    def compile_all(self) -> None:
        """Compile every bucket ahead of time, `EngineConfig.compile_workers` at once, with a
        progress bar on stderr that advances as each compile finishes.

        The bar is drawn only on a terminal: redrawn with carriage returns into a log
        file it would garble the lines after it, so there one line opens and one closes."""
        from tqdm import tqdm

        jobs = [k for k in self.compile_jobs() if k not in (self._samplers if _is_sampler(k) else self._compiled)]
        start = time.perf_counter()
        loaded = [k for k in jobs if self._load_stored(k)]   # a warm start lowers nothing
        jobs = [k for k in jobs if k not in loaded]
        show = self.cfg.show_progress
        if show and loaded:
            print(f"loaded {len(loaded)} compiled steps from {self.store.folder} in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if not jobs:
            return
        keys, samplers = [k for k in jobs if not _is_sampler(k)], [k for k in jobs if _is_sampler(k)]
        workers = compiler.resolve_workers(self.cfg.compile_workers, len(jobs))
        live = show and sys.stderr.isatty()
        if show and not live:
            print(f"compiling {len(keys)} step buckets and {len(samplers)} samplers, {workers} at a time ...",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        with tqdm(total=len(jobs), desc=f"compiling step buckets ({workers} at a time)", unit="bucket",
                  disable=not live, leave=True) as bar:
            def finished(key: tuple) -> None:
                bar.set_postfix_str(_job_label(key), refresh=False)
                bar.update(1)

            done = compiler.compile_all(
                jobs, lambda k: self._lower_sampler(*k) if _is_sampler(k) else self._lower(self.cache, *k),
                step_compiler_options(self.pipeline), workers, label=_job_label, on_done=finished)
        for key, compiled in done.items():
            self._keep(key, compiled)
        if show and not live:
            print(f"compiled {len(keys)} step buckets and {len(samplers)} samplers in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def _compile(self, t: int, w: int, decode_only: bool) -> Any:
        key = (t, w, decode_only)
        if self._load_stored(key):
            return self._compiled[key]
        lowered = self._lower(self.cache, t, w, decode_only)
        return self._keep(key, lowered.compile(step_compiler_options(self.pipeline)))

    def executable(self, t: int, w: int, decode_only: bool) -> Any:
        """The compiled step of one bucket (compiled now if start-up did not)."""
        if (t, w, decode_only) in self._compiled:
            return self._compiled[(t, w, decode_only)]
        log.info("compiling the step for T=%d W=%d%s", t, w, " (decode only)" if decode_only else "")
        return self._compile(t, w, decode_only)

    def sampler_executable(self, s: int, plan: SamplerPlan) -> Any:
        """The compiled `sample_step` for S rows and this plan (compiled now if not yet: a
        sampler compiles in about a second, a forward bucket in several)."""
        key = (s, plan)
        if key not in self._samplers and not self._load_stored(key):
            self._keep(key, self._lower_sampler(s, plan).compile())
        return self._samplers[key]

    def _lower_sampler(self, s: int, plan: SamplerPlan) -> Any:
        sharding = None if self.tp is None else self.tp.replicated   # the forward's logits are replicated
        i32, f32 = jnp.int32, jnp.float32
        shapes = (((s, self.model_cfg.vocab_size), f32), ((s,), i32), ((SEQ_INT_FIELDS, s), i32),
                  ((SEQ_FLOAT_FIELDS, s), f32), ((PEN_FIELDS, s, self.cfg.max_model_len), i32))
        args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]
        if not plan.penalties:
            args[-1] = None
        return self._sampler.lower(*args, plan=plan, num_logprobs=self.num_logprobs,
                                   max_num_seqs=self.cfg.max_num_seqs, tp=self.tp)

    def bucket_for(self, batch: ScheduledBatch) -> tuple[int, int]:
        width = max(len(r.seq.block_table) for r in batch.rows)
        t = next(b for b in self.token_buckets if b >= batch.num_tokens)
        w = next(b for b in self.width_buckets if b >= width)
        return t, w

    def prepare(self, batch: ScheduledBatch) -> tuple[tuple[int, int], tuple[np.ndarray, ...]]:
        """Host arrays of one batch, padded to its bucket (padding writes the null page)."""
        t_pad, w_pad = self.bucket_for(batch)
        s_pad, bs = self.cfg.seqs_for(t_pad), self.cfg.block_size
        # np.full, not np.zeros: numpy drops the GIL to zero-allocate anything over a few
        # hundred bytes, and with a server's event loop holding it, taking it back costs
        # this thread up to the interpreter's switch interval (5 ms) each time.
        tok = np.full((TOK_FIELDS, t_pad), 0, np.int32)
        tok[2] = NULL_PAGE * bs
        tok[4] = -1
        seq_i = np.full((SEQ_INT_FIELDS, s_pad), 0, np.int32)
        seq_f = np.full((SEQ_FLOAT_FIELDS, s_pad), 0, np.float32)
        seq_f[1] = 1.0
        seq_f[5] = 1.0
        query_start = np.full(s_pad + 1, batch.num_tokens, np.int32)
        block_table = np.full((s_pad, w_pad), NULL_PAGE, np.int32)
        rows = batch.rows
        r_n = len(rows)
        # Per-row scalars in one pass; the per-token arrays are then built with numpy, not
        # per-row slices (host time per iteration is what the async pipeline must hide).
        lens = np.fromiter((row.length for row in rows), np.int32, r_n)
        starts = np.fromiter((row.start for row in rows), np.int32, r_n)
        query_start[0] = 0
        np.cumsum(lens, out=query_start[1:r_n + 1])
        for r, row in enumerate(rows):
            table = row.seq.block_table
            block_table[r, : len(table)] = table
            t = query_start[r]
            if row.gather_row >= 0:
                tok[4, t] = row.gather_row
            else:
                tok[0, t:t + row.length] = row.seq.token_slice(row.start, row.start + row.length)
        n_tok = int(query_start[r_n])
        row_of = np.repeat(np.arange(r_n, dtype=np.int32), lens)
        pos = starts[row_of] + (np.arange(n_tok, dtype=np.int32) - query_start[:r_n][row_of])
        tok[1, :n_tok] = pos
        tok[2, :n_tok] = block_table[row_of, pos // bs] * bs + pos % bs
        tok[3, :n_tok] = row_of
        params = [row.seq.params for row in rows]
        seq_i[0, :r_n] = lens
        seq_i[1, :r_n] = starts + lens
        seq_i[2, :r_n] = query_start[1:r_n + 1] - 1
        seq_i[3, :r_n] = [sp.top_k for sp in params]
        seq_i[4, :r_n] = np.array([row.seq.seed for row in rows], np.uint32).view(np.int32)
        seq_i[5, :r_n] = starts + lens - np.fromiter((row.seq.prompt_len for row in rows), np.int32, r_n)
        seq_f[:, :r_n] = np.array([(sp.temperature, sp.top_p, sp.min_p, sp.presence_penalty, sp.frequency_penalty,
                                    sp.repetition_penalty) for sp in params], np.float32).reshape(r_n, 6).T
        num_decode = np.asarray(batch.num_decode, np.int32)
        return (t_pad, w_pad), (tok, seq_i, seq_f, query_start, block_table, num_decode)

    def pack_penalties(self, rows: Sequence[Any], s_pad: int, gen_index: np.ndarray) -> np.ndarray:
        """[PEN_FIELDS, S, max_model_len]: each penalised row's known tokens (all but its
        last input, which the sampler adds), its logit_bias, and -inf on its stop tokens
        while min_tokens is not reached (only for a batch whose plan has penalties)."""
        pen = self._empty_penalties(s_pad)
        for r, row in enumerate(rows):
            sp, seq = row.seq.params, row.seq
            if not sp.uses_penalties:
                continue
            if sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0:
                end = row.start + row.length - 1
                pen[0, r, :end] = seq.token_slice(0, end)
            ids, values = list(sp.logit_bias), list(sp.logit_bias.values())
            if gen_index[r] < sp.min_tokens:
                ids += seq.min_tokens_blocked
                values += [-np.inf] * len(seq.min_tokens_blocked)
            pen[1, r, :len(ids)] = ids
            pen[2, r, :len(ids)] = np.asarray(values, np.float32).view(np.int32)
        return pen

    def _empty_penalties(self, s_pad: int) -> np.ndarray:
        pen = np.full((PEN_FIELDS, s_pad, self.cfg.max_model_len), -1, np.int32)
        pen[2] = 0
        return pen

    def update_params(self, params: Any) -> None:
        """Swap in new weights of the same tree, shapes and dtypes (`engine.param_update`):
        the compiled steps and the KV pool stay; the old weights' buffers are reused."""
        params = param_update.as_plain_dicts(params)
        param_update.check_like(self._param_spec, params)
        # Each new leaf goes where the engine's matching leaf lives (under TP: where a
        # parameter is born on the mesh, before the re-layout).
        where = self.params if self.tp is None else self.tp.load_shardings()
        leaves = {jax.tree_util.keystr(path): getattr(x, "sharding", x)
                  for path, x in jax.tree_util.tree_flatten_with_path(where)[0]}
        fallback = next(iter(leaves.values()))
        moved = param_update.move_to(params, lambda path: leaves.get(path, fallback))
        self.params = self._relayout(self.params, moved)

    def prompt_logprobs(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Raw logprobs of prompt tokens 1.. (`sampler.token_logprobs` rows, one per token),
        from one dense forward over the prompt padded to a power of two (few compiles)."""
        if self.tp is not None:
            raise ValueError("prompt_logprobs needs tensor_parallel_size=1 (the dense scoring forward runs "
                             "on one device's weights)")
        n = len(ids)
        length = min(max(16, 1 << (n - 1).bit_length()), self.cfg.max_model_len)
        tokens = np.zeros(length, np.int32)
        tokens[:n] = ids
        targets = np.zeros(length, np.int32)
        targets[:n - 1] = ids[1:]
        lp_f, lp_i = self._score(self.params, tokens, targets, cfg=self.model_cfg, num_logprobs=self.num_logprobs)
        return np.asarray(lp_f)[:n - 1], np.asarray(lp_i)[:n - 1]

    def dispatch(self, batch: ScheduledBatch, prev_tokens: jax.Array | None,
                 send: Send | None = None) -> tuple[jax.Array, Any]:
        """Launch one iteration without waiting; returns its sampled tokens [max_num_seqs]
        and their log-probabilities (`sampler.token_logprobs`, filled where a row asks).
        With the offload ring, `send` names the window the step copies to host memory."""
        if (send is None) != (self.stage_spec is None):
            raise ValueError("the offload staging ring's window goes with every step when kv_offload_host_gb > 0, "
                             "and only then: pass send=engine.offload.next_send()")
        (t, w), (tok, seq_i, seq_f, query_start, block_table, num_decode) = self.prepare(batch)
        prev = self._zero_tokens if prev_tokens is None else prev_tokens
        decode_only = self.decode_only_steps and batch.num_decode == len(batch.rows)
        plan = plan_for([row.seq.params for row in batch.rows])
        pen = self.pack_penalties(batch.rows, seq_i.shape[1], seq_i[5]) if plan.penalties else None
        seq_i = jax.device_put(seq_i, None if self.tp is None else self.tp.replicated)   # once, for both steps
        ring = () if send is None else (send.stage, np.int32(send.index))
        logits, self.cache, last_token, *sent = self.executable(t, w, decode_only)(
            self.params, self.cache, tok, seq_i, query_start, block_table, num_decode, prev, *ring)
        if send is not None:
            send.on_sent(sent[0])
        return self.sampler_executable(seq_i.shape[1], plan)(logits, last_token, seq_i, seq_f, pen)
