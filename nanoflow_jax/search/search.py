"""NanoFlow's two-stage search over a kernel profile and an interference model.

One iteration is a dense batch of `tokens` tokens: `decodes` decode rows at `context`
cached tokens, then one prefill chunk (the engine's steady mixed iteration, as
`autosearch.mixed_batch` builds it). Its layers are cut into nano-batches (token ranges);
each nano-batch runs its layer as a chain of nano-operations: attention (decode and/or
prefill kernel), O projection, gate/up, down, the memory-bound norm/RoPE/KV-write group,
the next layer's QKV projection. The chains run on one or two GPU streams; the two
streams start together at every layer (the engine projects and writes every token's
K/V before the nano-batches' attention), so one layer's time is an event simulation of the two chains: each op at its SM
budget (the shares of two co-running ops scaled down to the SM count when they ask for
more), slowed by the interference factor while another op runs beside it, plus a launch
gap per kernel. The iteration is layers x that, plus the LM head and the sampler.

Stage 1 (structure): the number of nano-batches (1 .. max_nano), their token sizes (cuts
on a grid, and the engine's cut after the request rows), which stream each runs on, and
how stream 2's chain is rotated against stream 1's (which op of one nano-batch overlaps
which of the other). Stage 2 (shares): for each stream, the programs of its compute-bound
ops and of its memory-bound ops, from a grid of SM shares. Stage 1 ranks structures by a
lower bound no share assignment can beat (each op at its fastest budget with no
interference on its stream, and the SM-time of all ops spread over every SM); stage 2
searches every share assignment of a structure, best bound first, and stops when the next
bound cannot beat the best time found, so the result is the optimum of the whole space.

The engine runs a subset of this space: one nano-batch (`sequential`), or two cut after
the request rows, back to back (`nanobatch`) or on two streams with no rotation
(`nanoflow`, SM budgets as `nano_programs`). `search` reports each mode's predicted
time and the best engine-runnable `nano_programs`; the optimum of the whole space is
reported beside it, for what a future engine could gain.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from typing import Any, Iterator, Sequence

from nanoflow_jax.search.interference import Interference
from nanoflow_jax.search.profile import SHARE_FRACTIONS, Profile, default_programs

# Gaps between a stream's kernels inside one JAX program (bench/RESULTS.md, "Answered
# questions": 0.0-0.3 us with XLA's command buffers, 1.3 us without; the overlapped step
# compiles without them, models.streams.step_compiler_options).
GAP_MS_GRAPHS = 0.0003
GAP_MS_STREAMS = 0.0013
LAYER_OPS = ("decode_attention", "prefill_attention", "o", "gate_up", "down", "norm_rope", "qkv")

Op = tuple[str, float]                 # (profile op, work); ("gap", ms) is a launch gap
Shares = tuple[tuple[int, int], ...]   # per stream: (compute programs, memory programs)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One mixed iteration: `decodes` decode rows at `context` cached tokens, then one prefill
    chunk of the remaining tokens at positions context .. context + chunk - 1; `rows` is the
    engine's S bucket (max_num_seqs), where it cuts nano-batch A from B."""

    tokens: int
    decodes: int
    context: int
    rows: int

    def __post_init__(self) -> None:
        if not 0 <= self.decodes < self.rows < self.tokens or self.context < 0:
            raise ValueError(f"a mixed iteration needs 0 <= decodes < rows < tokens and context >= 0, got {self}")

    def nano_ops(self, start: int, stop: int) -> list[Op]:
        """The layer's chain of nano-ops for tokens [start, stop)."""
        dec = max(0, min(stop, self.decodes) - start)
        first = max(start, self.decodes)   # first prefill token of the range
        pre = stop - first
        # A prefill token at position context + i attends context + i + 1 keys.
        lo, hi = first - self.decodes, stop - self.decodes
        keys = pre * (self.context + 1) + (hi * (hi - 1) - lo * (lo - 1)) // 2 if pre > 0 else 0
        work = {"decode_attention": dec * (self.context + 1), "prefill_attention": keys}
        t = stop - start
        return [(op, work.get(op, t)) for op in LAYER_OPS if work.get(op, t) > 0]


@dataclasses.dataclass(frozen=True)
class Structure:
    """Stage 1's choice. cuts: token boundaries (0, ..., tokens); streams: each nano-batch's
    stream (1 or 2; all 1: back to back); rotation: the op stream 2's chain starts at."""

    cuts: tuple[int, ...]
    streams: tuple[int, ...]
    rotation: int = 0

    @property
    def overlapped(self) -> bool:
        return 2 in self.streams

    def chains(self, w: Workload, gap_ms: float) -> list[list[Op]]:
        chains: list[list[Op]] = [[], []]
        for (a, b), s in zip(zip(self.cuts, self.cuts[1:]), self.streams):
            chains[s - 1] += w.nano_ops(a, b)
        chains[1] = chains[1][self.rotation:] + chains[1][:self.rotation]
        return [[x for op in c for x in (("gap", gap_ms), op)] for c in chains if c]

    def describe(self) -> dict[str, Any]:
        return {"nano_batches": [{"tokens": [a, b], "stream": s} for (a, b), s in
                                 zip(zip(self.cuts, self.cuts[1:]), self.streams)], "rotation": self.rotation}


@dataclasses.dataclass(frozen=True)
class Candidate:
    structure: Structure
    shares: Shares
    layer_ms: float
    iteration_ms: float


class CostModel:
    """Predicted times from a profile and an interference model."""

    def __init__(self, profile: Profile, interference: Interference, num_layers: int,
                 gap_graphs_ms: float = GAP_MS_GRAPHS, gap_streams_ms: float = GAP_MS_STREAMS,
                 share_fractions: Sequence[float] = SHARE_FRACTIONS) -> None:
        self.profile, self.interference, self.num_layers = profile, interference, num_layers
        self.sms = profile.num_sms
        self.gaps = (gap_graphs_ms, gap_streams_ms)
        self.share_grid = list(default_programs(self.sms, share_fractions))
        self._factors: dict[tuple[str, float, str, float], float] = {}

    def gap(self, s: Structure) -> float:
        return self.gaps[1] if s.overlapped else self.gaps[0]

    def tail_ms(self, w: Workload) -> float:
        """The LM head and the sampler over the request rows (after the layers, in every mode)."""
        return self.profile.time("lm_head", w.rows) + self.profile.time("sampler", w.rows)

    def layer_ms(self, chains: list[list[Op]], shares: Shares, trace: list[dict[str, Any]] | None = None) -> float:
        """Both chains from a common start to the last op's end (event simulation); `trace`
        collects each op's stream, start and end."""
        time, kind, factor = self.profile.time, self.profile.kind, self._factor
        idx, left, t = [0] * len(chains), [1.0] * len(chains), 0.0
        began = [0.0] * len(chains)
        while True:
            active = [s for s in range(len(chains)) if idx[s] < len(chains[s])]
            if not active:
                return t
            ops = {s: chains[s][idx[s]] for s in active}
            want = {s: (shares[s][kind(op) == "memory"], kind(op)) for s, (op, _) in ops.items() if op != "gap"}
            total = sum(p for p, _ in want.values())
            scale = min(1.0, self.sms / total) if want else 1.0
            dur = {}
            for s, (op, work) in ops.items():
                if op == "gap":
                    dur[s] = work
                    continue
                p, k = want[s]
                d = time(op, work, p * scale)
                for o, (po, ko) in want.items():
                    if o != s:
                        d *= factor(k, p * scale, ko, po * scale)
                dur[s] = d
            dt = min(left[s] * dur[s] for s in active)
            t += dt
            for s in active:
                left[s] -= dt / dur[s] if dur[s] > 0 else 1.0
                if left[s] <= 1e-9:
                    if trace is not None and ops[s][0] != "gap":
                        trace.append({"stream": s + 1, "op": ops[s][0], "work": ops[s][1],
                                      "start_ms": round(began[s], 4), "end_ms": round(t, 4)})
                    idx[s], left[s], began[s] = idx[s] + 1, 1.0, t

    def _factor(self, kind: str, p: float, other: str, po: float) -> float:
        key = (kind, p, other, po)
        f = self._factors.get(key)
        if f is None:
            f = self._factors[key] = self.interference.factor(kind, p, other, po)
        return f

    def _fastest(self, op: str, work: float, programs: float) -> tuple[float, float]:
        """(least time, least SM-time) of op on at most `programs` programs: what sharing the SMs
        (which only ever lowers a budget) and interference (a factor >= 1) cannot beat."""
        prof = self.profile
        ps = [p for p in prof.ops[op].programs if p <= programs] + [programs]
        return (min(prof.time(op, work, p) for p in ps), min(p * prof.time(op, work, p) for p in ps))

    def _bounds(self, s: Structure, w: Workload) -> tuple[list[dict[tuple[int, int], float]], float]:
        """Per stream, (compute share, memory share) -> its ops' least total time (launch gaps
        included); and the least SM-time of all ops over every SM."""
        grid = [g for g in self.share_grid] if s.overlapped else [self.sms]
        streams, area = [], 0.0
        for chain in s.chains(w, self.gap(s)):
            gaps = sum(work for op, work in chain if op == "gap")
            ops = [(op, work) for op, work in chain if op != "gap"]
            area += sum(self._fastest(op, work, self.sms)[1] for op, work in ops)
            least = {(c, m): gaps + sum(self._fastest(op, work, m if self.profile.kind(op) == "memory" else c)[0]
                                        for op, work in ops) for c in grid for m in grid}
            streams.append(least)
        return streams, area / self.sms

    def lower_bound(self, s: Structure, w: Workload) -> float:
        """No share assignment of s is faster: each stream's ops at their fastest budget with no
        interference, and all ops' least SM-time over every SM."""
        streams, area = self._bounds(s, w)
        run = max(min(b.values()) for b in streams)
        return self.num_layers * max(run, area) + self.tail_ms(w)

    def share_space(self, s: Structure) -> Iterator[Shares]:
        if not s.overlapped:
            yield ((self.sms, self.sms),)
            return
        for c1, m1, c2, m2 in itertools.product(self.share_grid, repeat=4):
            yield (c1, m1), (c2, m2)

    def evaluate(self, s: Structure, w: Workload, shares: Shares) -> Candidate:
        layer = self.layer_ms(s.chains(w, self.gap(s)), shares)
        return Candidate(s, shares, layer, self.num_layers * layer + self.tail_ms(w))

    def best_shares(self, s: Structure, w: Workload, top: int = 1, beat: float = math.inf) -> list[Candidate]:
        """Stage 2 for one structure: the `top` fastest share assignments. Assignments are tried
        best bound first; with top=1, once a bound reaches the best time so far (or `beat`)
        no later one can do better and the search stops."""
        chains = s.chains(w, self.gap(s))
        tail = self.tail_ms(w)
        streams, area = self._bounds(s, w)

        def bound(shares: Shares) -> float:
            return self.num_layers * max(max(b[shares[i]] for i, b in enumerate(streams)), area) + tail

        scored: list[Candidate] = []
        limit = beat
        for lb, shares in sorted((bound(sh), sh) for sh in self.share_space(s)):
            if top == 1 and lb >= limit:
                break
            layer = self.layer_ms(chains, shares)
            cand = Candidate(s, shares, layer, self.num_layers * layer + tail)
            scored.append(cand)
            if top == 1:
                limit = min(limit, cand.iteration_ms)
        return heapq.nsmallest(top, scored, key=lambda c: c.iteration_ms)


def structures(w: Workload, max_nano: int = 3, cut_step: int | None = None) -> list[Structure]:
    """Stage 1's space: cuts on a grid of `cut_step` tokens (default tokens / 8, in whole
    16-token pages) plus the engine's cut after the rows; every assignment of nano-batches to
    streams whose first nano-batch is on stream 1 (the mirror image is the same schedule);
    and every rotation of stream 2's chain."""
    step = cut_step or max(16, (w.tokens // 8) // 16 * 16)
    grid = sorted(set(range(step, w.tokens, step)) | {w.rows})
    out = [Structure((0, w.tokens), (1,))]
    for n in range(2, max_nano + 1):
        for inner in itertools.combinations(grid, n - 1):
            cuts = (0, *inner, w.tokens)
            out.append(Structure(cuts, (1,) * n))   # back to back
            for rest in itertools.product((1, 2), repeat=n - 1):
                streams = (1, *rest)
                if 2 not in streams:
                    continue
                length = sum(len(w.nano_ops(a, b)) for (a, b), st in zip(zip(cuts, cuts[1:]), streams) if st == 2)
                out += [Structure(cuts, streams, r) for r in range(length)]
    return out


def two_stage(model: CostModel, w: Workload, space: Sequence[Structure]) -> tuple[Candidate, int]:
    """The fastest (structure, shares) of the space: stage 1 orders structures by their lower
    bound, stage 2 searches each one's shares until no bound can beat the best. Returns it and
    how many structures stage 2 searched."""
    ranked = sorted((model.lower_bound(s, w), i, s) for i, s in enumerate(space))
    best: Candidate | None = None
    searched = 0
    for bound, _, s in ranked:
        if best is not None and bound >= best.iteration_ms:
            break
        searched += 1
        found = model.best_shares(s, w, beat=best.iteration_ms if best else math.inf)
        if found and (best is None or found[0].iteration_ms < best.iteration_ms):
            best = found[0]
    assert best is not None
    return best, searched


def engine_structures(w: Workload) -> dict[str, Structure]:
    """The engine's three pipeline modes as structures."""
    cut = (0, w.rows, w.tokens)
    return {"sequential": Structure((0, w.tokens), (1,)), "nanobatch": Structure(cut, (1, 1)),
            "nanoflow": Structure(cut, (1, 2))}


def nano_programs(shares: Shares, sms: int) -> list[dict[str, int]]:
    """Stage 2's shares as EngineConfig.nano_programs (A's and B's budgets by op); a share
    of every SM is the kernel's own launch, so no budget. The KV write runs between the
    streams on the main stream and keeps its own launch."""
    out = []
    for compute, memory in shares:
        budgets = {}
        if compute < sms:
            budgets.update(gemm=compute, prefill_attention=compute)
        if memory < sms:
            budgets.update(decode_attention=memory, norm=memory, rope=memory)
        out.append(budgets)
    return out


def predict(model: CostModel, w: Workload, pipeline: str, budgets: Sequence[dict[str, int]]) -> float:
    """Predicted iteration ms of an engine mode with `nano_programs` budgets (gemm and
    decode_attention stand for a nano-batch's compute and memory shares)."""
    s = engine_structures(w)[pipeline]
    shares: Shares = ((model.sms, model.sms),)
    if s.overlapped:
        shares = tuple((b.get("gemm", model.sms), b.get("decode_attention", model.sms)) for b in budgets)
    return model.evaluate(s, w, shares).iteration_ms


def programs_spec(budgets: Sequence[dict[str, int]]) -> str:
    """[A, B] budgets -> autosearch's 'op=n,...|op=n,...' candidate string."""
    return "|".join(",".join(f"{op}={n}" for op, n in sorted(b.items())) for b in budgets)


def search(model: CostModel, w: Workload, *, max_nano: int = 3, cut_step: int | None = None,
           top: int = 3) -> dict[str, Any]:
    """Predicted time of each engine mode, the engine's `top` nanoflow budgets, and the
    optimum of the whole space."""
    modes = engine_structures(w)
    flow = model.best_shares(modes["nanoflow"], w, top=max(top, 1) * 4)
    predicted = {name: flow[0] if name == "nanoflow" else model.best_shares(s, w)[0] for name, s in modes.items()}
    seen, candidates = set(), []
    for c in flow:
        budgets = nano_programs(c.shares, model.sms)
        key = programs_spec(budgets)
        if key in seen:
            continue
        seen.add(key)
        candidates.append({"nano_programs": budgets, "predicted_ms": round(c.iteration_ms, 3)})
        if len(candidates) == top:
            break
    space = structures(w, max_nano, cut_step)
    best, searched = two_stage(model, w, space)
    timeline: list[dict[str, Any]] = []
    model.layer_ms(best.structure.chains(w, model.gap(best.structure)), best.shares, timeline)
    name = min(predicted, key=lambda m: predicted[m].iteration_ms)
    choice = {"pipeline": name, "predicted_ms": round(predicted[name].iteration_ms, 3),
              "nano_programs": nano_programs(predicted[name].shares, model.sms) if name == "nanoflow" else [{}, {}]}
    return {
        "batch": dataclasses.asdict(w),
        "predicted": {m: round(c.iteration_ms, 3) for m, c in predicted.items()},
        "candidates": candidates,
        "best": choice,
        "optimum": {**best.structure.describe(), "shares": [list(s) for s in best.shares],
                    "predicted_ms": round(best.iteration_ms, 3), "structures": len(space),
                    "structures_searched": searched, "layer_timeline": timeline},
    }


# ---- batch sizing ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchSizing:
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_bytes_per_token: int
    kv_pages: int
    pages_per_request: int
    weight_bytes: int
    kv_budget_bytes: int

    def workload(self, input_len: int, output_len: int) -> Workload:
        """The steady iteration: every row but one decoding at the average context (prompt plus
        half the output), one prefill chunk filling the rest of the dense batch."""
        return Workload(tokens=self.max_num_batched_tokens, decodes=self.max_num_seqs - 1,
                        context=input_len + output_len // 2, rows=self.max_num_seqs)


def size_batch(cfg: Any, dtype_bytes: int, memory_bytes: int, input_len: int, output_len: int,
               memory_fraction: float = 0.8, block_size: int = 16, seq_multiple: int = 64,
               token_multiple: int = 128, kv_dtype_bytes: int | None = None) -> BatchSizing:
    """max_num_seqs: the requests of input_len + output_len tokens whose KV pages fit in
    `memory_fraction` of the memory the weights leave (the engine's default share), in whole
    `seq_multiple`s. max_num_batched_tokens: the dense batch that keeps those rows decoding in
    steady state: each iteration finishes max_num_seqs / output_len requests on average, whose
    prompts (input_len tokens each) must be prefilled in the same iteration. The KV cache takes
    `kv_dtype_bytes` an element (default: the weights' `dtype_bytes`; 1 for an fp8 cache)."""
    if min(input_len, output_len) < 1 or not 0 < memory_fraction < 1:
        raise ValueError("input_len and output_len must be >= 1 and memory_fraction in (0, 1)")
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (kv_dtype_bytes or dtype_bytes)
    weights = cfg.num_params() * dtype_bytes
    budget = int(memory_fraction * (memory_bytes - weights))
    pages = budget // (kv_token * block_size)
    per_request = math.ceil((input_len + output_len) / block_size)
    seqs = (pages // per_request) // seq_multiple * seq_multiple
    if seqs < 1:
        raise ValueError(f"{memory_bytes / 2**30:.1f} GiB with {weights / 2**30:.1f} GiB of weights holds "
                         f"{pages // max(per_request, 1)} requests of {input_len + output_len} tokens, fewer than "
                         f"{seq_multiple}: use a larger GPU, shorter requests or a smaller seq_multiple")
    tokens = math.ceil(seqs * (input_len + output_len) / output_len / token_multiple) * token_multiple
    return BatchSizing(seqs, tokens, kv_token, pages, per_request, weights, budget)
