"""`LLM`: the offline facade (names follow vLLM): generate, chat and stream."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence as Seq

import jax

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine import param_update
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.llm_engine import LLMEngine, RequestError
from nanoflow_jax.engine.sampling_params import SamplingParams
from nanoflow_jax.engine.sequence import RequestOutput

log = logging.getLogger(__name__)

PromptInput = str | Seq[int] | Mapping[str, Any]
ParamsInput = SamplingParams | Mapping[str, Any] | None
Messages = Seq[Mapping[str, Any]]


def _normalize_prompts(prompts: PromptInput | Seq[PromptInput]) -> list[Any]:
    """One prompt or a list of them; a prompt is text, token ids or {"prompt_token_ids": [...]}.

    Nothing is converted here: the engine checks each prompt and rejects a bad one alone.
    """
    def one(p: Any) -> Any:
        if isinstance(p, Mapping):
            return p.get("prompt_token_ids", p.get("prompt", p))
        return p

    if isinstance(prompts, (str, bytes, bytearray, Mapping)):
        return [one(prompts)]
    try:
        items = list(prompts)
    except TypeError:
        return [prompts]   # not a prompt at all: the engine names the problem
    if items and not any(isinstance(t, (str, bytes, bytearray, Mapping)) or hasattr(t, "__iter__") for t in items):
        return [items]   # a single prompt given as token ids (scalars, checked by the engine)
    return [one(p) for p in items]


def render_chat(tokenizer: Any, messages: Messages | Seq[Messages], add_generation_prompt: bool) -> list[str]:
    """One conversation or several -> their prompt texts, through the model's chat template."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer: create the LLM with tokenizer=..., or generate from token ids")
    conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
    return [tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt)
            for c in conversations]


def _tp_placement(size: Any) -> Any:
    """The loader's placement for a tensor-parallel size (None: one device; a bad size is
    left to EngineConfig and the model check, which name it)."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 1:
        return None
    from nanoflow_jax.parallel.sharding import TensorParallel

    return lambda cfg: TensorParallel.create(cfg, size).load_shardings()


def _apply_searched_sizing(model_cfg: ModelConfig, engine_kwargs: dict[str, Any]) -> None:
    """With the pipeline left to `auto` on a GPU, the batch sizing `python -m
    nanoflow_jax.autosearch --search` chose for this model and GPU fills in max_num_seqs and
    max_num_batched_tokens where the caller gave neither."""
    from nanoflow_jax import autosearch

    if (engine_kwargs.get("pipeline", "auto") != "auto" or jax.default_backend() != "gpu"
            or any(k in engine_kwargs for k in autosearch.SIZING_KEYS)):
        return
    sizing = autosearch.searched_sizing(model_cfg, jax.devices()[0].device_kind,
                                        kv_cache_dtype=engine_kwargs.get("kv_cache_dtype", "auto"))
    if sizing:
        log.info("batch sizing from the searched pipeline file: %s", sizing)
        engine_kwargs.update(sizing)


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
            loaded = from_params(param_update.as_plain_dicts(params), config, None if dtype == "auto" else dtype,
                                 tokenizer)
            # The caller keeps (and trains) its arrays; update_params donates the engine's.
            loaded.params = param_update.own_copy(loaded.params)
        else:
            if dtype == "auto":
                dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
            # show_progress=False silences the weight loader's bar too.
            # Under tensor parallelism every weight goes straight to its devices, split.
            loaded = load_model(model, weights=weights, dtype=dtype,
                                progress=engine_kwargs.get("show_progress", True) is not False,
                                placement=_tp_placement(engine_kwargs.get("tensor_parallel_size", 1)))
            if tokenizer is not None:
                loaded.tokenizer = tokenizer
        mc = loaded.config
        if max_model_len is None:
            max_model_len = min(mc.max_position_embeddings, 2048)
        _apply_searched_sizing(mc, engine_kwargs)
        if "async_scheduling" in engine_kwargs and engine_kwargs["async_scheduling"] is None:
            del engine_kwargs["async_scheduling"]   # None: follow NANOFLOW_ASYNC
        self.engine_config = EngineConfig(max_model_len=max_model_len, **engine_kwargs)
        self.model_config = mc
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded.params, mc, self.engine_config, loaded.tokenizer)
        self._next_id = 0
        # One engine, many callers: the lock serializes engine use, and every update is
        # routed to the queue of the call that owns its request, so interleaved streams
        # and generate calls (other threads or one) never take each other's outputs.
        self._lock = threading.RLock()
        self._routes: dict[str, collections.deque[RequestOutput]] = {}

    @property
    def next_request_index(self) -> int:
        """Requests are named gen-<n> in submission order; this is the next n."""
        return self._next_id

    def _add_all(self, prompts: list[Any], sampling_params: ParamsInput | Seq[ParamsInput],
                 add_special_tokens: bool, inbox: collections.deque[RequestOutput], stream: bool = True) -> list[str]:
        """Queue every prompt, its updates routed to `inbox`; a bad one's error output goes there at once.

        If queuing raises part-way (KeyboardInterrupt too), the prompts already queued are aborted.
        """
        if isinstance(sampling_params, Seq) and not isinstance(sampling_params, (str, Mapping)):
            per = list(sampling_params)
            if len(per) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(per)} sampling params: give one, or one each")
        else:
            per = [sampling_params] * len(prompts)
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, per):
                rid = f"gen-{self._next_id}"
                self._next_id += 1
                ids.append(rid)
                try:
                    self.engine.add_request(prompt, sp, request_id=rid, add_special_tokens=add_special_tokens,
                                            stream=stream)
                except RequestError as e:
                    log.warning("%s", e)
                    inbox.append(RequestOutput.rejected(rid, prompt, str(e)))
                    continue
                self._routes[rid] = inbox
        except BaseException:
            self._release(ids)
            raise
        return ids

    def _release(self, ids: Seq[str]) -> None:
        """Abort whichever of these requests still run, and stop routing their updates.

        Every id is aborted, routed or not: one queued just before an interrupt has no route yet.
        """
        for rid in ids:
            self._routes.pop(rid, None)
            self.engine.abort(rid)   # None for a finished or rejected one

    def _pump(self) -> None:
        """One engine step (lock held); each update goes to its owner's queue."""
        if not self.engine.has_unfinished():
            lost = sorted(self._routes)
            raise RuntimeError(f"requests {lost[:5]} left the engine without a final update while their "
                               "callers wait: do not abort LLM's requests on LLM.engine directly; close "
                               "the stream (or interrupt the call) instead")
        for out in self.engine.step():
            inbox = self._routes.get(out.request_id)
            if inbox is not None:
                inbox.append(out)
                if out.finished:
                    del self._routes[out.request_id]

    def stream(self, prompts: PromptInput | Seq[PromptInput], sampling_params: ParamsInput | Seq[ParamsInput] = None,
               *, add_special_tokens: bool = True) -> Iterator[RequestOutput]:
        """Incremental outputs as tokens arrive (`outputs[0].delta_text` is the new text).

        The lock is held per engine step, not across yields: other streams and calls
        progress while this consumer works, and a stream abandoned early aborts its requests.
        """
        inbox: collections.deque[RequestOutput] = collections.deque()
        with self._lock:
            ids = self._add_all(_normalize_prompts(prompts), sampling_params, add_special_tokens, inbox)
        pending = set(ids)
        try:
            while pending:
                if not inbox:
                    with self._lock:
                        if not inbox:   # another caller may have stepped for us meanwhile
                            self._pump()
                while inbox:
                    out = inbox.popleft()
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            with self._lock:
                self._release(ids)

    def generate(self, prompts: PromptInput | Seq[PromptInput], sampling_params: ParamsInput | Seq[ParamsInput] = None,
                 *, use_tqdm: bool | Callable[..., Any] = True, add_special_tokens: bool = True) -> list[RequestOutput]:
        """Final outputs, in input order. A rejected or failed prompt's output has `.error` set.

        `use_tqdm` (vLLM's): a progress bar on stderr; False hides it; a callable is used in
        place of `tqdm.tqdm` (same arguments). The whole call holds the lock; if it raises
        (KeyboardInterrupt too), its requests are aborted.
        """
        from tqdm import tqdm as default_bar

        tqdm = use_tqdm if callable(use_tqdm) else default_bar
        inbox: collections.deque[RequestOutput] = collections.deque()
        final: dict[str, RequestOutput] = {}
        with self._lock:
            # Only final outputs are kept here: the engine builds no update before a request ends.
            ids = self._add_all(_normalize_prompts(prompts), sampling_params, add_special_tokens, inbox, stream=False)
            try:
                with tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=use_tqdm is False) as bar:
                    while True:
                        while inbox:
                            out = inbox.popleft()
                            if out.finished:
                                final[out.request_id] = out
                                bar.update(1)
                        if len(final) == len(ids):
                            break
                        self._pump()
            finally:
                self._release(ids)
        return [final[rid] for rid in ids]

    def update_params(self, params: Any) -> None:
        """Swap the weights between generate calls (e.g. after an optimizer step).

        `params` has the tree, shapes and dtypes the LLM was built with (a Flax `params`
        collection works as it is); arrays on a training mesh are moved device to device.
        No step recompiles and the KV cache is kept; a mismatch raises a ValueError naming
        the leaf."""
        with self._lock:
            self.engine.update_params(params)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV page (vLLM's name); False when prefix caching is off."""
        with self._lock:
            return self.engine.reset_prefix_cache()

    def _render_chat(self, messages: Messages | Seq[Messages], add_generation_prompt: bool) -> list[str]:
        return render_chat(self.tokenizer, messages, add_generation_prompt)

    def chat(self, messages: Messages | Seq[Messages], sampling_params: ParamsInput | Seq[ParamsInput] = None,
             *, add_generation_prompt: bool = True,
             use_tqdm: bool | Callable[..., Any] = True) -> list[RequestOutput]:
        """Chat-templated generation: one conversation (a list of messages) or a list of them."""
        texts = self._render_chat(messages, add_generation_prompt)
        return self.generate(texts, sampling_params, use_tqdm=use_tqdm, add_special_tokens=False)

    def chat_stream(self, messages: Messages | Seq[Messages], sampling_params: ParamsInput | Seq[ParamsInput] = None,
                    *, add_generation_prompt: bool = True) -> Iterator[RequestOutput]:
        texts = self._render_chat(messages, add_generation_prompt)
        return self.stream(texts, sampling_params, add_special_tokens=False)
