"""`LLM`: the offline facade (names follow vLLM): generate, chat and stream."""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Sequence as Seq

import jax

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.llm_engine import LLMEngine, RequestError
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import RequestOutput

log = logging.getLogger(__name__)

PromptInput = str | Seq[int] | Mapping[str, Any]
ParamsInput = SamplingParams | Mapping[str, Any] | None
Messages = Seq[Mapping[str, Any]]


def _normalize_prompts(prompts: PromptInput | Seq[PromptInput]) -> list[str | list[int]]:
    """One prompt or a list of them; a prompt is text, token ids or {"prompt_token_ids": [...]}."""
    def one(p: PromptInput) -> str | list[int]:
        if isinstance(p, Mapping):
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            return p["prompt"]
        return p if isinstance(p, str) else list(p)

    if isinstance(prompts, (str, Mapping)):
        return [one(prompts)]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]   # a single prompt given as token ids
    return [one(p) for p in prompts]


class LLM:
    """An engine over a model from disk (`model=`) or from memory (`params=` + `config=`).

    Engine knobs (max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
    num_kv_pages / kv_memory_fraction, seed, async_scheduling, ...) are EngineConfig fields.
    Without a tokenizer, prompts must be token ids and outputs carry no text.
    """

    def __init__(self, model: str | None = None, *, weights: str = "auto", dtype: str = "auto",
                 params: Any = None, config: ModelConfig | None = None, tokenizer: Any = None,
                 max_model_len: int | None = None, **engine_kwargs: Any) -> None:
        from nanoflow_jax.weights.loader import from_params, load_model

        if params is not None:
            if config is None:
                raise ValueError("LLM(params=...) also needs config=ModelConfig(...)")
            loaded = from_params(params, config, None if dtype == "auto" else dtype, tokenizer)
        else:
            if dtype == "auto":
                dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
            # show_progress=False silences the weight loader's bar too.
            loaded = load_model(model, weights=weights, dtype=dtype,
                                progress=engine_kwargs.get("show_progress", True) is not False)
            if tokenizer is not None:
                loaded.tokenizer = tokenizer
        mc = loaded.config
        if max_model_len is None:
            max_model_len = min(mc.max_position_embeddings, 2048)
        if "async_scheduling" in engine_kwargs and engine_kwargs["async_scheduling"] is None:
            del engine_kwargs["async_scheduling"]   # None: follow NANOFLOW_ASYNC
        self.engine_config = EngineConfig(max_model_len=max_model_len, **engine_kwargs)
        self.model_config = mc
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded.params, mc, self.engine_config, loaded.tokenizer)
        self._next_id = 0

    @property
    def next_request_index(self) -> int:
        """Requests are named gen-<n> in submission order; this is the next n."""
        return self._next_id

    def _add_all(self, prompts: list[str | list[int]], sampling_params: ParamsInput | Seq[ParamsInput],
                 add_special_tokens: bool = True) -> tuple[list[str], dict[str, RequestOutput]]:
        """Queue every prompt; a bad one becomes an error output, the others still run."""
        if isinstance(sampling_params, Seq) and not isinstance(sampling_params, (str, Mapping)):
            per = list(sampling_params)
            if len(per) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(per)} sampling params: give one, or one each")
        else:
            per = [sampling_params] * len(prompts)
        ids, rejected = [], {}
        for prompt, sp in zip(prompts, per):
            rid = f"gen-{self._next_id}"
            self._next_id += 1
            try:
                self.engine.add_request(prompt, sp, request_id=rid, add_special_tokens=add_special_tokens)
            except RequestError as e:
                log.warning("%s", e)
                rejected[rid] = RequestOutput.rejected(rid, prompt, str(e))
            ids.append(rid)
        return ids, rejected

    def stream(self, prompts: PromptInput | Seq[PromptInput], sampling_params: ParamsInput | Seq[ParamsInput] = None,
               *, add_special_tokens: bool = True) -> Iterator[RequestOutput]:
        """Incremental outputs as tokens arrive (`outputs[0].delta_text` is the new text)."""
        ids, rejected = self._add_all(_normalize_prompts(prompts), sampling_params, add_special_tokens)
        yield from rejected.values()
        pending = set(ids) - set(rejected)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:   # the consumer stopped early: free those requests' pages
                self.engine.abort(rid)

    def generate(self, prompts: PromptInput | Seq[PromptInput], sampling_params: ParamsInput | Seq[ParamsInput] = None,
                 *, use_tqdm: bool = False, add_special_tokens: bool = True) -> list[RequestOutput]:
        """Final outputs, in input order. A rejected prompt's output has `.error` set."""
        ids, rejected = self._add_all(_normalize_prompts(prompts), sampling_params, add_special_tokens)
        final: dict[str, RequestOutput] = dict(rejected)
        wanted = set(ids)
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        bar.update(len(rejected))
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [final[rid] for rid in ids]

    def _render_chat(self, messages: Messages | Seq[Messages], add_generation_prompt: bool) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer: create the LLM with tokenizer=..., or generate from token ids")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        return [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt)
                for c in conversations]

    def chat(self, messages: Messages | Seq[Messages], sampling_params: ParamsInput | Seq[ParamsInput] = None,
             *, add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Chat-templated generation: one conversation (a list of messages) or a list of them."""
        texts = self._render_chat(messages, add_generation_prompt)
        return self.generate(texts, sampling_params, use_tqdm=use_tqdm, add_special_tokens=False)

    def chat_stream(self, messages: Messages | Seq[Messages], sampling_params: ParamsInput | Seq[ParamsInput] = None,
                    *, add_generation_prompt: bool = True) -> Iterator[RequestOutput]:
        texts = self._render_chat(messages, add_generation_prompt)
        return self.stream(texts, sampling_params, add_special_tokens=False)
