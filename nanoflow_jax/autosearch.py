"""`python -m nanoflow_jax.autosearch`: pick the pipeline mode and nano-batch SM budgets by measurement.

    python -m nanoflow_jax.autosearch --model llama-3-8b [--tokens 2048 --decodes 255 --context 1280]
        [--candidates 'gemm=32|gemm=100;gemm=24,decode_attention=40|gemm=108']

On the GPU at hand it times one mixed dense batch (decodes at a cached context plus one
prefill chunk: the engine's steady iteration) in every pipeline mode and, for `nanoflow`,
in every candidate split of the SMs between the two nano-batches; then it writes the
fastest to `configs/pipelines/<model shape>-<device>.json` with every measured time. An
engine built with `pipeline="auto"` (the default) loads that file for its model's shape
and GPU by itself; without one it runs `sequential` and says how to make one.

    python -m nanoflow_jax.autosearch --model llama-3-8b --search [--profile FILE] [--interference FILE]
        [--input-len 1024 --output-len 512] [--verify 3]

`--search` runs NanoFlow's model-based search first (nanoflow_jax.search): it profiles
every kernel against tokens and SM budget (or reads `--profile FILE`), takes the
interference of overlapped kernels (seeded from measurements, or `--interference
measure|FILE`), sizes max_num_seqs and max_num_batched_tokens from the KV memory, searches
nano-batch structures and SM shares, and then times the `--verify` best predicted
candidates with every mode as above. The file records each mode's predicted time beside
the measured one. On a CPU, `--profile FILE --verify 0` writes the predicted choice for
the profile's GPU without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import KV_CACHE_DTYPE_CHOICES, PIPELINES, ModelConfig
from nanoflow_jax.models.ops import programs_key
from nanoflow_jax.models.paged import BatchInputs, KVCache, kv_cache_dtype

log = logging.getLogger(__name__)
PIPELINES_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipelines"
# Splits worth timing when the caller names none: B's GEMMs on most SMs, A's on the rest.
DEFAULT_CANDIDATES = ("gemm=32|gemm=100", "gemm=44|gemm=88")
NanoPrograms = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def shape_key(cfg: ModelConfig) -> str:
    """The model's shape, which is all its speed depends on (weights of any values share it)."""
    bias = "-bias" if cfg.attention_bias else ""
    return (f"{cfg.architecture}-l{cfg.num_layers}-e{cfg.hidden_size}-f{cfg.intermediate_size}"
            f"-h{cfg.num_heads}-kv{cfg.num_kv_heads}-d{cfg.head_dim}-v{cfg.vocab_size}{bias}")


def device_key(device_kind: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


def choice_path(cfg: ModelConfig, device_kind: str, directory: Path | None = None) -> Path:
    return (directory or PIPELINES_DIR) / f"{shape_key(cfg)}-{device_key(device_kind)}.json"


def parse_programs(spec: str) -> tuple[dict[str, int], dict[str, int]]:
    """'gemm=32,decode_attention=44|gemm=100' -> nano-batch A's and B's SM budgets."""
    halves = spec.split("|")
    if len(halves) != 2:
        raise ValueError(f"SM budgets take A's and B's separated by '|', e.g. 'gemm=32|gemm=100'; got {spec!r}")
    out = []
    for half in halves:
        budgets: dict[str, int] = {}
        for item in filter(None, half.split(",")):
            op, sep, value = item.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"SM budget {item!r} is not op=programs (e.g. gemm=32)")
            budgets[op.strip()] = int(value)
        programs_key(budgets)  # names and values checked here
        out.append(budgets)
    return out[0], out[1]


def _read_choice(cfg: ModelConfig, device_kind: str, directory: Path | None,
                 parse: Callable[[dict[str, Any]], Any]) -> Any:
    """`parse` of this model's and GPU's choice file (None where there is none); a file it
    cannot parse is named in the error."""
    path = choice_path(cfg, device_kind, directory)
    if not path.exists():
        return None
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a pipeline choice written by `python -m nanoflow_jax.autosearch` ({e}): "
                         "run the search again or delete the file") from e


def load_choice(cfg: ModelConfig, device_kind: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The searched pipeline for this model shape and GPU: {"pipeline", "nano_programs"}, or None."""
    def parse(record: dict[str, Any]) -> dict[str, Any]:
        best = record["best"]
        pipeline = best["pipeline"]
        budgets = best.get("nano_programs") or [{}, {}]
        if pipeline not in PIPELINES or len(budgets) != 2:
            raise ValueError(f"pipeline {pipeline!r} / {len(budgets)} budget sets")
        return {"pipeline": pipeline, "nano_programs": tuple(dict(b) for b in budgets)}
    return _read_choice(cfg, device_kind, directory, parse)


SIZING_KEYS = ("max_num_seqs", "max_num_batched_tokens")


def _cache_kind(kv_cache_dtype: str) -> str:
    return "fp8" if kv_cache_dtype.startswith("fp8") else kv_cache_dtype   # fp8 and fp8_e4m3 are one dtype


def searched_sizing(cfg: ModelConfig, device_kind: str, directory: Path | None = None,
                    kv_cache_dtype: str = "auto") -> dict[str, int] | None:
    """The batch sizing the search chose from this GPU's KV memory ({max_num_seqs,
    max_num_batched_tokens}), or None when no choice file (or none with a sizing for this
    KV cache dtype: an fp8 cache holds twice the requests) exists."""
    def parse(record: dict[str, Any]) -> dict[str, int] | None:
        engine = record.get("engine") or {}
        if _cache_kind(str(engine.get("kv_cache_dtype", "auto"))) != _cache_kind(kv_cache_dtype):
            return None
        sizing = {k: engine[k] for k in SIZING_KEYS if k in engine}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizing.values()):
            raise ValueError(f"sizing {sizing} is not positive integers")
        return sizing if len(sizing) == len(SIZING_KEYS) else None
    return _read_choice(cfg, device_kind, directory, parse)


def resolve_pipeline(pipeline: str, nano_programs: Any, cfg: ModelConfig,
                     directory: Path | None = None) -> tuple[str, Any]:
    """`auto` -> the searched choice for this model and GPU, else `sequential`; other modes pass."""
    if pipeline != "auto":
        return pipeline, nano_programs
    if jax.default_backend() != "gpu":  # no streams to overlap: the split would only cost
        return "sequential", None
    device = jax.devices()[0].device_kind
    choice = load_choice(cfg, device, directory)
    if choice is None:
        log.warning("no searched pipeline for this model on %s (%s): running `sequential`; "
                    "`python -m nanoflow_jax.autosearch --model ...` measures and writes one",
                    device, choice_path(cfg, device, directory).name)
        return "sequential", None
    return choice["pipeline"], choice["nano_programs"]


def mixed_batch(cfg: ModelConfig, decodes: int, context: int, tokens: int, rows: int, page: int,
                seed: int = 0) -> tuple[BatchInputs, int]:
    """`decodes` decode rows, then one prefill chunk of the remaining tokens; S = rows.
    Returns the batch and the pages its cache needs (each row owns just its own pages)."""
    rng = np.random.default_rng(seed)
    chunk = tokens - decodes
    if decodes + 1 > rows or chunk < 1:
        raise ValueError(f"{decodes} decodes + one chunk need {decodes + 1} <= rows={rows} and tokens > decodes")
    need = [-(-(context + 1) // page)] * decodes + [-(-(context + chunk) // page)]
    order = rng.permutation(np.arange(1, sum(need) + 1)).astype(np.int32)
    table = np.zeros((rows, max(need)), np.int32)   # unused entries: the null page
    starts = np.cumsum([0] + need)
    for r, n in enumerate(need):
        table[r, :n] = order[starts[r]:starts[r] + n]
    pos = np.concatenate([np.full(decodes, context), np.arange(context, context + chunk)]).astype(np.int32)
    seq = np.concatenate([np.arange(decodes), np.full(chunk, decodes)]).astype(np.int32)
    qs = np.full(rows + 1, tokens, np.int32)
    qs[: decodes + 2] = np.concatenate([np.arange(decodes + 1), [tokens]])
    ctx = np.zeros(rows, np.int32)
    ctx[: decodes + 1] = pos[qs[1:decodes + 2] - 1] + 1
    batch = BatchInputs(
        token_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, tokens), jnp.int32), positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(table[seq, pos // page] * page + pos % page), token_seq=jnp.asarray(seq),
        query_start=jnp.asarray(qs), query_len=jnp.asarray(np.diff(qs)), context_len=jnp.asarray(ctx),
        block_table=jnp.asarray(table), logits_index=jnp.asarray(np.maximum(qs[1:] - 1, 0)),
        num_decode=jnp.asarray(decodes, jnp.int32))
    return batch, int(starts[-1]) + 1


def compile_step(params: Any, cache: KVCache, batch: BatchInputs, cfg: ModelConfig, kernels: str, pipeline: str,
                 nano: NanoPrograms) -> Any:
    """The engine's forward for one pipeline mode, jitted with the cache donated, compiled."""
    from nanoflow_jax.models.nanobatch import forward_pipeline
    from nanoflow_jax.models.streams import step_compiler_options

    step = jax.jit(forward_pipeline, static_argnames=("cfg", "kernels", "pipeline", "nano_programs"),
                   donate_argnums=(1,))
    return step.lower(params, cache, batch, cfg, kernels, pipeline, nano).compile(step_compiler_options(pipeline))


def time_step(compiled: Any, params: Any, cache: KVCache, batch: BatchInputs, iters: int) -> tuple[float, KVCache]:
    """Median ms of `iters` calls after 3 warm ones; returns the (donated, updated) cache too."""
    for _ in range(3):
        _, cache = compiled(params, cache, batch)
    jax.block_until_ready(cache)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        logits, cache = compiled(params, cache, batch)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), cache


def search(cfg: ModelConfig, params: Any, *, kernels: str = "auto", tokens: int = 2048, decodes: int = 255,
           context: int = 1280, rows: int = 256, candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
           iters: int = 10, show_progress: bool = True) -> dict[str, Any]:
    """Times every mode and candidate on one mixed batch; the fastest is `best`."""
    from tqdm import tqdm

    from nanoflow_jax.models.params import fuse_qkv

    params = fuse_qkv(params)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    batch, pages = mixed_batch(cfg, decodes, context, tokens, rows, page=16)
    shape = (cfg.num_layers, pages, 16, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))  # values do not change the time
    runs = [(mode, "") for mode in PIPELINES] + [("nanoflow", spec) for spec in candidates]
    measured = []
    for pipeline, spec in tqdm(runs, desc="autosearch", unit="candidate", disable=not show_progress):
        budgets = parse_programs(spec) if spec else ({}, {})
        nano = (programs_key(budgets[0]), programs_key(budgets[1]))
        t0 = time.perf_counter()
        compiled = compile_step(params, cache, batch, cfg, kernels, pipeline, nano)
        compile_s = time.perf_counter() - t0
        ms, cache = time_step(compiled, params, cache, batch, iters)
        measured.append({"pipeline": pipeline, "nano_programs": [budgets[0], budgets[1]],
                         "iteration_ms": round(ms, 3), "compile_s": round(compile_s, 1)})
    best = min(measured, key=lambda r: r["iteration_ms"])
    return {"batch": {"tokens": tokens, "decodes": decodes, "context": context, "rows": rows},
            "measured": measured, "best": best}


def search_inputs(a: argparse.Namespace, cfg: ModelConfig, stem: Path) -> tuple[Any, Any]:
    """--search's profile and interference model: read from files, seeded, or measured on this
    GPU (then saved beside the choice as <stem>.profile.json / .interference.json)."""
    from nanoflow_jax.search.interference import DEFAULT, Interference, measure_interference
    from nanoflow_jax.search.profile import Profile, measure_profile

    if a.profile:
        profile = Profile.load(a.profile)
    else:
        # ProfileUnavailable off a GPU; a run cut off by a time limit resumes from the partial file.
        partial = Path(f"{stem}.profile.partial.json")
        profile = measure_profile(cfg, a.dtype, shape=shape_key(cfg), partial=partial)
        profile.save(f"{stem}.profile.json")
        partial.unlink(missing_ok=True)
    here = jax.devices()[0].device_kind
    if a.verify and here != profile.device:
        raise ValueError(f"verifying by measurement needs the profiled GPU ({profile.device}); this is {here}. "
                         "Pass --verify 0 to write the predicted choice")
    if profile.shape != shape_key(cfg):
        raise ValueError(f"the profile is of model shape {profile.shape}, not {a.model}'s ({shape_key(cfg)})")
    if profile.source != "measured":
        log.warning("%s is a %s profile, not a measurement: its choice says nothing about a real GPU",
                    a.profile, profile.source)
    if a.interference == "default":
        return profile, DEFAULT
    if a.interference == "measure":
        interference = measure_interference()
        interference.save(f"{stem}.interference.json")
        return profile, interference
    return profile, Interference.load(a.interference)


def model_search(a: argparse.Namespace, cfg: ModelConfig, out_dir: Path | None) -> tuple[str, dict[str, Any]]:
    """--search: profile and interference, batch sizing, the two-stage search, then the --verify
    best candidates measured. Returns the device the choice is for and the record."""
    from nanoflow_jax.search import search as ms

    stem = choice_path(cfg, jax.devices()[0].device_kind, out_dir).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    profile, interference = search_inputs(a, cfg, stem)
    memory = int(a.gpu_memory_gib * 2**30) if a.gpu_memory_gib else profile.memory_bytes
    if memory <= 0:
        raise ValueError("the profile records no device memory: pass --gpu-memory-gib")
    sizing = ms.size_batch(cfg, jnp.dtype(a.dtype).itemsize, memory, a.input_len, a.output_len,
                           a.memory_fraction, kv_dtype_bytes=kv_cache_dtype(a.kv_cache_dtype, a.dtype).itemsize)
    w = sizing.workload(a.input_len, a.output_len)
    w = ms.Workload(tokens=a.tokens or w.tokens, rows=a.rows or w.rows,
                    decodes=a.decodes if a.decodes is not None else (a.rows or w.rows) - 1,
                    context=a.context if a.context is not None else w.context)
    model = ms.CostModel(profile, interference, cfg.num_layers)
    found = ms.search(model, w, max_nano=a.max_nano_batches, top=max(a.verify, 1))
    record: dict[str, Any] = {
        "engine": {"max_num_seqs": sizing.max_num_seqs, "max_num_batched_tokens": sizing.max_num_batched_tokens,
                   "kv_pages": sizing.kv_pages, "kv_cache_dtype": a.kv_cache_dtype, "input_len": a.input_len, "output_len": a.output_len,
                   "memory_bytes": memory, "memory_fraction": a.memory_fraction},
        "search": {"profile": a.profile or f"{stem}.profile.json", "profile_source": profile.source,
                   "interference": interference.to_json(), "candidates": found["candidates"],
                   "optimum": found["optimum"]},
        "batch": found["batch"], "predicted": found["predicted"]}
    if a.verify == 0:
        return profile.device, {**record, "verified": False, "best": found["best"]}
    from nanoflow_jax.models.params import init_params

    specs = tuple(ms.programs_spec(c["nano_programs"]) for c in found["candidates"][:a.verify]
                  if any(c["nano_programs"]))
    measured = search(cfg, init_params(cfg, jax.random.key(0), a.dtype), kernels=a.kernels, tokens=w.tokens,
                      decodes=w.decodes, context=w.context, rows=w.rows, candidates=specs, iters=a.iters,
                      show_progress=sys.stderr.isatty())
    for r in measured["measured"]:
        r["predicted_ms"] = round(ms.predict(model, w, r["pipeline"], r["nano_programs"]), 3)
    return profile.device, {**record, **measured, "verified": True}


def main(argv: list[str] | None = None) -> int:
    from nanoflow_jax.models.params import init_params
    from nanoflow_jax.search.profile import ProfileUnavailable

    p = argparse.ArgumentParser(prog="python -m nanoflow_jax.autosearch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shipped model config (configs/models/), e.g. llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--tokens", type=int, default=None,
                   help="the dense batch (max_num_batched_tokens; default 2048, with --search the sized one)")
    p.add_argument("--rows", type=int, default=None,
                   help="request rows (max_num_seqs; default 256, with --search the sized one)")
    p.add_argument("--decodes", type=int, default=None, help="decode rows (default rows - 1)")
    p.add_argument("--context", type=int, default=None,
                   help="cached tokens of each decode (default 1280, with --search input + output / 2)")
    p.add_argument("--candidates", default=";".join(DEFAULT_CANDIDATES),
                   help="nanoflow SM splits to time, 'A|B' each, ';'-separated (without --search)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out-dir", default=None, help=f"where the choice goes (default {PIPELINES_DIR})")
    s = p.add_argument_group("model-based search (--search)")
    s.add_argument("--search", action="store_true", help="search structures and SM shares from kernel profiles")
    s.add_argument("--profile", default=None, help="a kernel profile JSON to search from instead of profiling")
    s.add_argument("--interference", default="default",
                   help="default (seeded from measured overlaps) | measure (on this GPU) | an interference JSON")
    s.add_argument("--input-len", type=int, default=1024, help="prompt tokens of a typical request")
    s.add_argument("--output-len", type=int, default=512, help="generated tokens of a typical request")
    s.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPE_CHOICES),
                   help="the cache the batch is sized for: auto (the weights' dtype) or fp8 (twice the requests)")
    s.add_argument("--memory-fraction", type=float, default=0.8,
                   help="share of the memory left after the weights that the KV cache takes")
    s.add_argument("--gpu-memory-gib", type=float, default=None, help="device memory (default: the profile's)")
    s.add_argument("--max-nano-batches", type=int, default=3)
    s.add_argument("--verify", type=int, default=3,
                   help="predicted-best nanoflow candidates to time with every mode (0: write the prediction)")
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir) if a.out_dir else None
    command = "python -m nanoflow_jax.autosearch " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        cfg = ModelConfig.from_name(a.model)
        if a.search:
            if a.verify < 0 or a.max_nano_batches < 1:
                raise ValueError("--verify must be >= 0 and --max-nano-batches >= 1")
            device, result = model_search(a, cfg, out_dir)
        else:
            candidates = tuple(c for c in a.candidates.split(";") if c)
            for c in candidates:
                parse_programs(c)
    except (ValueError, ProfileUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.search:
        params = init_params(cfg, jax.random.key(0), a.dtype)
        rows = a.rows or 256
        result = search(cfg, params, kernels=a.kernels, tokens=a.tokens or 2048,
                        decodes=a.decodes if a.decodes is not None else rows - 1,
                        context=a.context if a.context is not None else 1280, rows=rows,
                        candidates=candidates, iters=a.iters, show_progress=sys.stderr.isatty())
        device = jax.devices()[0].device_kind
    path = choice_path(cfg, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": a.model, "shape": shape_key(cfg), "device": device, "jax": jax.__version__,
              "dtype": a.dtype, "kernels": a.kernels,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, **result}
    path.write_text(json.dumps(record, indent=1) + "\n")
    if "engine" in result:
        e = result["engine"]
        print(f"sized from KV memory: max_num_seqs {e['max_num_seqs']}, max_num_batched_tokens "
              f"{e['max_num_batched_tokens']} ({e['input_len']} + {e['output_len']}-token requests)")
    for mode, ms in result.get("predicted", {}).items():
        print(f"{mode:>10} predicted: {ms:.2f} ms")
    for r in result.get("measured", []):
        print(f"{r['pipeline']:>10} {json.dumps(r['nano_programs'])}: {r['iteration_ms']:.2f} ms")
    best = result["best"]
    how = (f"{best['iteration_ms']:.2f} ms measured" if "iteration_ms" in best
           else f"{best['predicted_ms']:.2f} ms predicted")
    print(f"best: {best['pipeline']} {json.dumps(best['nano_programs'])} ({how}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
