"""`LLMEngine`: add_request / step / abort, and the one-iteration-late host pipeline.

Async scheduling (NanoFlow's CPU side): `step()` forms and dispatches iteration i+1 while
iteration i still runs on the device, then reads i's sampled tokens. Decode rows of i+1
take their input token from i's device output (gathered inside the jitted step), so the
host never waits for the device before launching more work. The price: EOS and stop
strings are seen one iteration late, and the token sampled meanwhile is dropped. With
`async_scheduling=False` (or NANOFLOW_ASYNC=0) each step waits for its own tokens.

A failure inside `step()` is contained: a request that breaks forming, packing or reading
back its batch ends with finish_reason "error" and `.error` set, its pages are freed, and
the other requests carry on. An LLMEngine is not thread-safe (`LLM` adds the locking).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.block_manager import BlockManager
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.model_runner import ModelRunner
from nanoflow_jax.engine.kv_offload import make_offloader, model_fingerprint
from nanoflow_jax.engine.prefix_cache import PrefixCacheStats
from nanoflow_jax.engine.prompts import Prompt, prompt_token_ids
from nanoflow_jax.engine.sampling_params import SamplingParams, is_int
from nanoflow_jax.engine.scheduler import ScheduledBatch, ScheduledRow, ScheduleError, Scheduler
from nanoflow_jax.engine.sequence import Logprob, PositionLogprobs, RequestMetrics, RequestOutput, Sequence
from nanoflow_jax.engine.stop import finish_check

log = logging.getLogger(__name__)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of an n > 1 request (sample 0 keeps the request's own)."""
    return (seed + index * 0x9E3779B9) % 2**32


class RequestError(ValueError):
    """One request is malformed; the engine and all other requests carry on."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id!r}: {message}")
        self.request_id = request_id


class LLMEngine:
    def __init__(self, params: Any, model_config: ModelConfig, config: EngineConfig | None = None,
                 tokenizer: Any | None = None) -> None:
        self.cfg = config or EngineConfig()
        self.model_config = model_config
        self.tokenizer = tokenizer
        if self.cfg.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.cfg.max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_config.max_position_embeddings}")
        self.runner = ModelRunner(params, model_config, self.cfg)
        self.blocks = BlockManager(self.runner.num_pages, self.cfg.block_size, self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.cfg, self.blocks)
        self.offload = make_offloader(self.cfg, model_config, self.runner)
        self.scheduler.offload = self.offload
        self.blocks.record_evictions = self.offload is not None
        if self.offload is not None and self.runner.precompile:
            self.runner.cache = self.offload.warm_up(self.runner.cache, self.runner.num_pages)
        if tokenizer is not None:
            self.eos_ids = frozenset(tokenizer.eos_token_ids)
        else:
            self.eos_ids = frozenset(() if model_config.eos_token_id is None else (model_config.eos_token_id,))
        self._seqs: dict[str, Sequence] = {}
        self._arrival = itertools.count()
        self._seed_rng = np.random.default_rng(self.cfg.seed)
        # The batch in flight, its sampled tokens and their logprobs (model_runner.dispatch).
        self._inflight: tuple[ScheduledBatch, jax.Array, Any] | None = None
        self._carry: list[RequestOutput] = []   # updates of a step that raised, handed out next step
        self._launching: ScheduledBatch | None = None   # dispatched, not yet tracked as in flight
        self.num_iterations = 0
        self.num_prefill_tokens = 0   # prompt (and recomputed) tokens fed in prefill chunks

    # ---- requests ------------------------------------------------------------------

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | Mapping[str, Any] | None = None,
                    request_id: str | None = None, add_special_tokens: bool = True, stream: bool = True,
                    stream_interval: int = 1) -> str:
        """Queue one request; raises RequestError (naming the problem) if it cannot run.

        A text prompt is encoded with `add_special_tokens` (False for chat-templated text,
        whose template already wrote them). `stream` False: `step` reports the request only
        when it finishes (or fails), as vLLM's FINAL_ONLY outputs; building an update copies
        its tokens and text, which for hundreds of running requests costs the host
        milliseconds a step. `stream_interval` N: a streamed request's updates come with its
        first token, then every N tokens, and at its end (vLLM's --stream-interval)."""
        now = time.time()
        arrival = next(self._arrival)
        rid = str(arrival) if request_id is None else str(request_id)
        if rid in self._seqs:
            raise RequestError(rid, "this request id is already in use: pass a unique request_id")
        if not is_int(stream_interval) or stream_interval < 1:
            raise RequestError(rid, f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        try:
            params = SamplingParams.coerce(sampling_params)
            ids = prompt_token_ids(prompt, self.tokenizer, self.model_config.vocab_size, add_special_tokens)
        except (ValueError, TypeError) as e:
            raise RequestError(rid, str(e)) from None
        max_len = self.cfg.max_model_len
        if len(ids) >= max_len:
            raise RequestError(rid, f"the prompt has {len(ids)} tokens but max_model_len={max_len} must also "
                                    "leave room for one output token: shorten the prompt or raise max_model_len")
        max_tokens = min(params.max_tokens or max_len, max_len - len(ids))
        pages = self.blocks.pages_for(len(ids) + max_tokens)
        if pages > self.blocks.num_usable:
            raise RequestError(rid, f"{len(ids)} prompt + {max_tokens} output tokens need {pages} KV pages of "
                                    f"{self.cfg.block_size} tokens but the pool has {self.blocks.num_usable}: "
                                    "lower max_tokens or raise num_kv_pages / kv_memory_fraction")
        if params.stop and self.tokenizer is None:
            raise RequestError(rid, "stop strings need a tokenizer: use stop_token_ids instead")
        blocked = self._check_logit_inputs(rid, params)
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**32))
        try:
            prompt_lps = None if params.prompt_logprobs is None else self._prompt_logprobs(ids, params.prompt_logprobs)
        except ValueError as e:
            raise RequestError(rid, str(e)) from None
        metrics = RequestMetrics(arrival_time=now)   # one per request, shared by its n samples
        group: list[Sequence] = []
        for i in range(params.n):
            # Sample i > 0 is an internal sequence of its own (own id, seed stream and
            # pages past the shared prompt); the outputs report them all under `rid`.
            seq = Sequence(request_id=rid if i == 0 else f"{rid}[{i}]", arrival=arrival if i == 0 else next(self._arrival),
                           prompt=prompt if isinstance(prompt, str) else None, prompt_token_ids=ids, params=params,
                           seed=sample_seed(seed, i), max_tokens=max_tokens, min_tokens_blocked=blocked,
                           metrics=metrics, prompt_logprobs=prompt_lps, index=i, stream=stream,
                           stream_interval=int(stream_interval),
                           group=group if params.n > 1 else None, leader=group[0] if i else None)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            if self.tokenizer is not None:
                seq.detok = self.tokenizer.stream_decoder(skip_special_tokens=params.skip_special_tokens)
            group.append(seq)
        for seq in group:
            self.scheduler.add(seq)
        self.scheduler.prefetch(group[0])   # the samples share one prompt
        self._seqs[rid] = group[0]
        return rid

    def _check_logit_inputs(self, rid: str, params: SamplingParams) -> list[int]:
        """Check what the sampler packs per row; returns the stop tokens min_tokens holds off."""
        vocab, cap = self.model_config.vocab_size, self.cfg.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > cap:
                raise RequestError(rid, f"{name}={getattr(params, name)} exceeds max_logprobs={cap}: ask for "
                                        "fewer or raise EngineConfig.max_logprobs")
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise RequestError(rid, f"logit_bias names token {bad[0]}, outside the vocabulary of {vocab}")
        blocked = []
        if params.min_tokens:
            eos = () if params.ignore_eos else sorted(self.eos_ids)
            blocked = [t for t in dict.fromkeys([*eos, *params.stop_token_ids]) if t < vocab]
        if len(params.logit_bias) + len(blocked) > self.cfg.max_model_len:
            raise RequestError(rid, f"logit_bias has {len(params.logit_bias)} entries (+{len(blocked)} stop tokens "
                                    f"held by min_tokens); at most max_model_len={self.cfg.max_model_len} fit")
        return blocked

    def update_params(self, params: Any) -> None:
        """New weights for the next requests (same tree, shapes, dtypes); nothing recompiles,
        the KV pool stays, and any prefix cache is dropped (its K/V came from the old weights)."""
        if self.scheduler.has_unfinished() or self._carry:
            raise RuntimeError("update_params swaps weights between requests, but some are still running: "
                               "wait for them (or abort them) first")
        if self._inflight is not None:
            # The token a request sampled after its late-seen stop is still on its way:
            # read it (and drop it) before the weights it was computed with go.
            self._carry = self.step()
        self.runner.update_params(params)
        if self.offload is not None and self.offload.disk is not None:
            # Pages stored from now on come from the new weights: a restart with the old ones
            # must not reuse them (the reset below rewrites the manifest with this).
            self.offload.disk.fingerprint = model_fingerprint(self.model_config, self.cfg.block_size,
                                                              self.runner.kv_dtype, self.runner.params)
        self.reset_prefix_cache()

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its pages are freed. None if it is unknown or already done."""
        seq = self._seqs.get(str(request_id))
        if seq is None:
            return None
        for member in seq.group or [seq]:
            if not member.is_finished:
                self.scheduler.finish(member, "abort")
        return self._output(seq)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV page (e.g. after the weights change); the requests in
        flight keep their pages. True when prefix caching is on."""
        self.blocks.reset_prefix_cache()
        self.blocks.offload_pending.clear()
        if self.offload is not None:
            self.offload.clear()
        return self.blocks.prefix_cache is not None

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Lookup counters (requests, queried and hit tokens, evictions); None when caching is off."""
        cache = self.blocks.prefix_cache
        return None if cache is None else cache.stats

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None or bool(self._carry)

    def stats(self) -> dict[str, int]:
        """Counts a server exports as metrics: requests by state, KV pages, and so far: preemptions,
        prefix-cache tokens looked up and hit, pages offloaded, loaded back and not offloaded
        (the copies to host memory too far behind)."""
        cache, offload = self.prefix_cache_stats, self.offload.stats if self.offload is not None else None
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_pages_total": self.blocks.num_usable, "kv_pages_free": self.blocks.num_free,
                "num_preemptions": self.scheduler.num_preemptions, "num_iterations": self.num_iterations,
                "prefix_cache_queries": cache.queries if cache else 0, "prefix_cache_hits": cache.hits if cache else 0,
                "kv_offload_saved_pages": offload.saved_pages if offload else 0,
                "kv_offload_loaded_pages": offload.loaded_pages if offload else 0,
                "kv_offload_skipped_pages": offload.skipped_pages if offload else 0}

    def _output(self, seq: Sequence) -> RequestOutput:
        """The update for one request (a finished one is forgotten: it reports only once)."""
        members = seq.group or [seq]
        if all(m.is_finished for m in members):
            self._seqs.pop(members[0].request_id, None)
            if seq.metrics is not None and seq.metrics.finished_time is None:
                seq.metrics.finished_time = time.time()
        return RequestOutput.from_sequence(seq, {id(m): (m.take_delta(), m.take_token_delta()) for m in members})

    def _reports(self, seq: Sequence) -> bool:
        """Its request has not given its final update yet (n > 1: its leader is still known)."""
        lead = (seq.group or [seq])[0]
        return self._seqs.get(lead.request_id) is lead

    def _fail(self, seq: Sequence, what: str, error: BaseException) -> RequestOutput:
        """End one request with finish_reason "error"; its pages go back to the pool."""
        seq.error = f"request {seq.request_id!r}: {what} failed ({type(error).__name__}: {error})"
        log.warning("%s; the other requests carry on", seq.error)
        self.scheduler.finish(seq, "error")
        return self._output(seq)

    # ---- iterations ----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an update for every request that got a token or failed.

        If it raises (KeyboardInterrupt included), the updates it had made are handed out
        by the next step, so no request's final update is lost.
        """
        outputs, self._carry = self._carry, []
        try:
            self._iterate(outputs)
        except BaseException as e:
            if self._launching is not None:
                # Interrupted between dispatch and tracking: those rows' tokens can never
                # be read, so their requests fail rather than count on them.
                outputs += [self._fail(row.seq, "tracking its dispatched batch", e)
                            for row in self._launching.rows if not row.seq.is_finished]
                self._launching = None
            self._carry = outputs
            raise
        return outputs

    def _iterate(self, outputs: list[RequestOutput]) -> None:
        if self.offload is not None:
            self.offload.land()
        batch = self._form(outputs)
        self._move_kv()
        launched = None
        if batch is not None:
            launched = self._launch(batch, outputs)
        elif self._inflight is None and self.scheduler.has_unfinished() and not outputs:
            self._unstall(outputs)
        if not self.cfg.async_scheduling:
            self._inflight, launched = launched, None
        done, self._inflight = self._inflight, launched
        self._launching = None
        if done is None:
            return
        try:
            self._read_back(*done, outputs)
            if self.offload is not None and not self.has_unfinished():
                # Idle next: copy out the last finished requests' pages now, not when the
                # next request arrives (or never, at shutdown).
                self._move_kv()
                self.offload.flush()
                self.offload.land(wait=True)
        except BaseException as e:
            # Rows not read back lost their token: fail those requests rather than leave
            # them waiting for it forever; one that finished unreported reports now.
            batch = done[0]
            for row in batch.rows[batch.num_read:]:
                if not row.seq.is_finished and row.samples:
                    outputs.append(self._fail(row.seq, "reading back its batch", e))
                elif row.seq.is_finished and self._reports(row.seq):
                    outputs.append(self._output(row.seq))
            raise

    def _move_kv(self) -> None:
        """Dispatch the offload tiers' copies ahead of the next batch: loads into fresh pages
        (which it reads), then saves of finished requests' and evicted pages (which it may
        overwrite)."""
        if self.offload is None:
            return
        self.runner.cache = self.offload.dispatch_loads(self.runner.cache)
        pending, self.blocks.offload_pending = self.blocks.offload_pending, []
        self.offload.save(self.runner.cache, pending)

    def _unstall(self, outputs: list[RequestOutput]) -> None:
        """Nothing ran although requests wait: fail those waiting for a token that no
        in-flight batch will deliver (they block the others); anything else is a bug."""
        sched = self.scheduler
        stuck = [q for q in sched.running + sched.waiting if q.num_pending]
        if not stuck:
            raise RuntimeError(f"scheduler stalled: {len(sched.waiting)} waiting, {len(sched.running)} "
                               f"running, {self.blocks.num_free} free pages")
        lost = RuntimeError("its sampled token was lost with an interrupted step")
        outputs += [self._fail(q, "waiting for its next token", lost) for q in stuck]

    def _form(self, outputs: list[RequestOutput]) -> ScheduledBatch | None:
        """The next batch; a request that breaks forming it fails alone (each retry drops one)."""
        while True:
            try:
                return self.scheduler.form()
            except ScheduleError as e:
                if e.seq.is_finished:
                    raise   # not the request's fault: retrying would fail the same way
                outputs.append(self._fail(e.seq, "scheduling", e.cause))

    def _launch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> tuple[ScheduledBatch, jax.Array, Any] | None:
        """Dispatch the batch, or fail the rows that cannot be packed and leave the rest for later."""
        prev = self._inflight[1] if self._inflight is not None else None
        try:
            send = self.offload.next_send() if self.offload is not None else None
            tokens, logprobs = self.runner.dispatch(batch, prev, send)
            self._launching = batch
        except Exception as e:
            errors = [(row, self._pack_error(row, i < batch.num_decode)) for i, row in enumerate(batch.rows)]
            culprits = [(row, err) for row, err in errors if err is not None]
            # No single row fails alone: the batch as a whole failed; fail its requests
            # rather than retry the same batch forever.
            for row, err in culprits or [(row, e) for row in batch.rows]:
                if not row.seq.is_finished:
                    outputs.append(self._fail(row.seq, "packing its batch for the device", err))
            return None
        self.scheduler.commit(batch)
        self.num_iterations += 1
        now = time.time()
        for row in batch.rows:
            m = row.seq.metrics
            if m is not None and m.first_scheduled_time is None:
                m.first_scheduled_time, m.time_in_queue = now, now - m.arrival_time
        self.num_prefill_tokens += sum(row.length for row in batch.rows[batch.num_decode:])
        return batch, tokens, logprobs

    def _pack_error(self, row: ScheduledRow, decode: bool) -> Exception | None:
        """The error packing this row alone raises, if any."""
        alone = ScheduledBatch(rows=[row], num_decode=int(decode), num_tokens=row.length, num_preempted=0)
        try:
            self.runner.prepare(alone)
        except Exception as e:
            return e
        return None

    def _read_back(self, batch: ScheduledBatch, tokens: jax.Array, logprobs: Any,
                   outputs: list[RequestOutput]) -> None:
        """Read one iteration's tokens (np.asarray waits for it) and turn them into updates."""
        try:
            host = np.asarray(tokens)
            wanted = any(row.seq.logprobs is not None for row in batch.rows)
            lp_f, lp_i = (np.asarray(logprobs[0]), np.asarray(logprobs[1])) if wanted else (None, None)
        except Exception as e:
            outputs += [self._fail(row.seq, "running its batch on the device", e)
                        for row in batch.rows if row.samples and not row.seq.is_finished]
            return
        # n > 1: one update per request after the whole batch is read, not one per sample
        # (each update copies every sample's tokens so far).
        groups: dict[int, Sequence] = {}
        try:
            for i, row in enumerate(batch.rows):
                seq = row.seq
                # Skipped: a mid-prompt chunk, or the extra token after a late-seen stop.
                if row.samples and not seq.is_finished:
                    seq.num_pending -= 1
                    token = int(host[i])
                    try:
                        if seq.logprobs is not None:
                            self._append_logprobs(seq, token, lp_f[i], lp_i[i])
                        self._append(seq, token)
                        if seq.group is not None:
                            groups.setdefault(id(seq.group[0]), seq)
                        elif seq.is_finished or seq.streams_now():
                            outputs.append(self._output(seq))
                    except Exception as e:
                        outputs.append(self._fail(seq, f"detokenizing token {token}", e))
                batch.num_read = i + 1
        finally:   # also when interrupted: a group that finished here reports now
            outputs += [self._output(seq) for seq in groups.values() if self._reports(seq)
                        and (seq.streams_now() or all(m.is_finished for m in seq.group))]

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[PositionLogprobs | None]:
        """vLLM's prompt_logprobs: None for the first token, then each token's entry."""
        lp, top = self.runner.prompt_logprobs(ids)
        return [None] + [self.position_logprobs(ids[j + 1], float(lp[j, 0]), int(top[j, 0]), top[j, 1:1 + k],
                                                lp[j, 1:1 + k]) for j in range(len(ids) - 1)]

    def _append_logprobs(self, seq: Sequence, token: int, lp: np.ndarray, ids: np.ndarray) -> None:
        """The sampled token's logprob and rank (column 0), then the request's top ones."""
        entry = self.position_logprobs(token, float(lp[0]), int(ids[0]), ids[1:1 + seq.params.logprobs],
                                       lp[1:1 + seq.params.logprobs])
        seq.logprobs.append(entry)
        seq.cumulative_logprob += float(lp[0])

    def position_logprobs(self, token: int, logprob: float, rank: int, top_ids: np.ndarray,
                          top_lp: np.ndarray) -> PositionLogprobs:
        """vLLM's shape: {token: Logprob}, the chosen token first, then the top ones by rank."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for j, (t, v) in enumerate(zip(top_ids.tolist(), top_lp.tolist())):
            if t not in entry:
                entry[t] = Logprob(float(v), j + 1, self._decode_one(t))
        return entry

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)

    def _append(self, seq: Sequence, token: int) -> None:
        """Add one output token and its text; finish the request if it ends here."""
        m = seq.metrics
        if m is not None:
            m.last_token_time = time.time()
            if m.first_token_time is None:
                m.first_token_time = m.last_token_time
        seq.output_token_ids.append(token)
        delta = seq.detok.add(token) if seq.detok is not None else ""
        end = finish_check(seq, token, delta, self.eos_ids)
        if end is not None:
            self.scheduler.finish(seq, *end)
