"""`LLMEngine`: add_request / step / abort, and the one-iteration-late host pipeline.

Async scheduling (NanoFlow's CPU side): `step()` forms and dispatches iteration i+1 while
iteration i still runs on the device, then reads i's sampled tokens. Decode rows of i+1
take their input token from i's device output (gathered inside the jitted step), so the
host never waits for the device before launching more work. The price: EOS and stop
strings are seen one iteration late, and the token sampled meanwhile is dropped. With
`async_scheduling=False` (or NANOFLOW_ASYNC=0) each step waits for its own tokens.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence as Seq

import jax
import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.block_manager import BlockManager
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.model_runner import ModelRunner
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.scheduler import ScheduledBatch, Scheduler
from nanoflow_jax.engine.sequence import RequestOutput, Sequence

Prompt = str | Seq[int]


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
        self.blocks = BlockManager(self.runner.num_pages, self.cfg.block_size)
        self.scheduler = Scheduler(self.cfg, self.blocks)
        if tokenizer is not None:
            self.eos_ids = frozenset(tokenizer.eos_token_ids)
        else:
            self.eos_ids = frozenset(() if model_config.eos_token_id is None else (model_config.eos_token_id,))
        self._seqs: dict[str, Sequence] = {}
        self._arrival = itertools.count()
        self._seed_rng = np.random.default_rng(self.cfg.seed)
        self._inflight: tuple[ScheduledBatch, jax.Array] | None = None
        self.num_iterations = 0

    # ---- requests ------------------------------------------------------------------

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | Mapping[str, Any] | None = None,
                    request_id: str | None = None, add_special_tokens: bool = True) -> str:
        """Queue one request; raises RequestError (naming the problem) if it cannot run.

        A text prompt is encoded with `add_special_tokens` (False for chat-templated text,
        whose template already wrote them)."""
        arrival = next(self._arrival)
        rid = str(arrival) if request_id is None else str(request_id)
        if rid in self._seqs:
            raise RequestError(rid, "this request id is already in use: pass a unique request_id")
        try:
            params = SamplingParams.coerce(sampling_params)
        except (ValueError, TypeError) as e:
            raise RequestError(rid, str(e)) from None
        ids = self._prompt_ids(rid, prompt, add_special_tokens)
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
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**32))
        seq = Sequence(request_id=rid, arrival=arrival, prompt=prompt if isinstance(prompt, str) else None,
                       prompt_token_ids=ids, params=params, seed=seed, max_tokens=max_tokens)
        if self.tokenizer is not None:
            seq.detok = self.tokenizer.stream_decoder(skip_special_tokens=True)
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def _prompt_ids(self, rid: str, prompt: Prompt, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(rid, "a text prompt needs a tokenizer: pass token ids, or create the "
                                        "engine with a tokenizer")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RequestError(rid, f"a prompt must be a str or a list of token ids, got "
                                        f"{type(prompt).__name__}") from None
        if not ids:
            raise RequestError(rid, "the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(rid, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its pages are freed. None if it is unknown or already done."""
        seq = self._seqs.pop(str(request_id), None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return RequestOutput.from_sequence(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- iterations ----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an update for every request that got a token."""
        batch = self.scheduler.schedule()
        launched = None
        if batch is not None:
            prev = self._inflight[1] if self._inflight is not None else None
            launched = (batch, self.runner.dispatch(batch, prev))
            self.num_iterations += 1
        elif self._inflight is None and self.scheduler.has_unfinished():
            raise RuntimeError(f"scheduler stalled: {len(self.scheduler.waiting)} waiting, "
                               f"{len(self.scheduler.running)} running, {self.blocks.num_free} free pages")
        if not self.cfg.async_scheduling:
            self._inflight, launched = launched, None
        outputs: list[RequestOutput] = []
        if self._inflight is not None:
            done, tokens = self._inflight
            # np.asarray blocks until that iteration is finished; in async mode the next
            # one is already queued behind it, so the device stays busy meanwhile.
            outputs = self._process(done, np.asarray(tokens))
        self._inflight = launched
        return outputs

    def _process(self, batch: ScheduledBatch, tokens: np.ndarray) -> list[RequestOutput]:
        outputs = []
        for i, row in enumerate(batch.rows):
            seq = row.seq
            if not row.samples or seq.is_finished:
                continue   # a mid-prompt chunk, or the extra token after a late-seen stop
            seq.num_pending -= 1
            token = int(tokens[i])
            seq.output_token_ids.append(token)
            delta = seq.detok.add(token) if seq.detok is not None else ""
            delta = self._check_stop(seq, token, delta)
            if seq.is_finished:
                self._seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput.from_sequence(seq, delta, [token]))
        return outputs

    def _check_stop(self, seq: Sequence, token: int, delta: str) -> str:
        """Append `delta` to the text and finish the request if it should stop here."""
        params, old_len = seq.params, len(seq.text)
        seq.text += delta
        if not params.ignore_eos and token in self.eos_ids:
            self.scheduler.finish(seq, "stop")
        elif token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        elif params.stop and delta:
            # Only the tail can hold a new match: a stop string may straddle tokens.
            search_from = max(0, old_len - max(len(s) for s in params.stop) + 1)
            hits = [(seq.text.find(s, search_from), s) for s in params.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, s = min(hits)
                seq.text = seq.text[:at]
                self.scheduler.finish(seq, "stop", s)
                return seq.text[old_len:]
        if not seq.is_finished and len(seq.output_token_ids) >= seq.max_tokens:
            self.scheduler.finish(seq, "length")
        if seq.is_finished and seq.detok is not None and seq.finish_reason == "length":
            tail = seq.detok.flush()
            seq.text += tail
            delta += tail
        return delta
