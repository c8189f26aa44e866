"""Tokenizers for nanoflow_jax: a `tokenizers.Tokenizer` built from GGUF metadata or from a
Hugging Face folder (`tokenizer.json`), plus special tokens, chat templates and a
streaming decoder.

GGUF: only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt. Its
pre-tokenizer comes from `tokenizer.ggml.pre`, the name llama.cpp gives the split
rules of the original `tokenizer.json`.

Digit splitting (a deliberate choice): the original SmolLM2 `tokenizer.json` splits
every digit on its own (a `Digits(individual_digits=True)` step before `ByteLevel`),
and llama.cpp's `smollm` pre-tokenizer does the same, so "2024" is 4 tokens. The
`transformers` GGUF loader drops that step and would give "2024" as one or two tokens,
which the model never saw in training. `Tokenizer.from_gguf(..., split_digits=None)`
(the default) follows the GGUF's pre-tokenizer type, i.e. splits digits for
`smollm` (and the other llama.cpp types that split digits the same way);
`split_digits=False` reproduces transformers' GGUF tokenizer exactly; `True` forces the
individual-digit step on any type. Types whose own regex groups digits (`llama-bpe`
groups up to 3, `qwen2` splits singly) keep their regex either way.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

# llama.cpp's GGUF token types (`tokenizer.ggml.token_type`).
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(7)

# Pre-tokenizer types (`tokenizer.ggml.pre`) grouped by how they split text. The regexes are
# the published split rules of those tokenizers (GPT-2's is ByteLevel's built-in one).
_GPT2_TYPES = frozenset({"default", "gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling"})
_DIGIT_TYPES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_TYPES = {
    "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "smaug-bpe": _LLAMA3_REGEX, "dbrx": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX, "stablelm2": _QWEN2_REGEX,
}

# Besides the declared EOS, generation also stops at these end-of-turn markers when the
# vocabulary has them as special tokens (instruct models often end a turn with one of them).
_EXTRA_EOS_TOKENS = ("<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                     "<end_of_turn>", "<|end_of_text|>")


class TokenizerError(ValueError):
    """The tokenizer files are missing, malformed or of a kind this project cannot build."""


# ---------------------------------------------------------------- GGUF metadata (header only)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file, without touching its tensors."""
    from nanoflow_jax.weights.errors import WeightLoadError
    from nanoflow_jax.weights.gguf_file import read_metadata

    try:
        return read_metadata(path)
    except WeightLoadError as e:
        raise TokenizerError(str(e)) from e


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """Tokenizer keys of an open `gguf.GGUFReader` (decoded with its own field accessor)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            out[key] = field.contents()
    return out


# ---------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one model."""

    def __init__(self, backend: _Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 extra_eos_token_ids: Iterable[int] = (), chat_template: str | None = None) -> None:
        self.backend = backend
        self._bos = bos_token_id
        self._eos = eos_token_id
        eos = set(extra_eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self._eos_ids = frozenset(eos)
        self._chat_template = chat_template

    # --- construction

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any, split_digits: bool | None = None) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file: a path, an open `GGUFFile` or
        `gguf.GGUFReader`, or its already-decoded metadata (a mapping of key -> value, as
        `read_gguf_metadata` gives).

        `split_digits`: None follows the GGUF's pre-tokenizer type (see the module docstring),
        False never adds the individual-digit step, True always adds it.
        """
        if isinstance(path_or_reader, (str, Path)):
            meta = read_gguf_metadata(path_or_reader)
            where = str(path_or_reader)
        elif hasattr(path_or_reader, "metadata") and hasattr(path_or_reader, "path"):  # a GGUFFile
            meta, where = path_or_reader.metadata, str(path_or_reader.path)
        elif hasattr(path_or_reader, "fields"):
            meta = _metadata_from_reader(path_or_reader)
            where = str(getattr(getattr(path_or_reader, "data", None), "filename", None) or "the GGUF reader")
        elif isinstance(path_or_reader, Mapping):
            meta, where = path_or_reader, "the GGUF metadata"
        else:
            raise TypeError(f"from_gguf takes a path, a gguf.GGUFReader or its metadata dict, not {type(path_or_reader).__name__}")
        return _build_from_gguf(meta, where, split_digits)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` of a Hugging Face model folder, with the special tokens and chat
        template of `tokenizer_config.json` (or `chat_template.jinja`) and the EOS ids of
        `generation_config.json`."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(
                f"{root} has no tokenizer.json; only fast (tokenizers-library) tokenizers are supported. "
                "Save one with transformers' `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`.")
        backend = _Backend.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")

        def token_id(entry: Any) -> int | None:
            content = entry.get("content") if isinstance(entry, dict) else entry
            return backend.token_to_id(content) if isinstance(content, str) else None

        bos, eos = token_id(config.get("bos_token")), token_id(config.get("eos_token"))
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos:
            eos = gen_eos[0]
        template = _hf_chat_template(root, config)
        extra = set(gen_eos) | _special_eos_ids(backend)
        return cls(backend, bos_token_id=bos, eos_token_id=eos, extra_eos_token_ids=extra, chat_template=template)

    # --- properties

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the EOS plus end-of-turn tokens the vocabulary has."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def bos_token(self) -> str | None:
        return None if self._bos is None else self.backend.id_to_token(self._bos)

    @property
    def eos_token(self) -> str | None:
        return None if self._eos is None else self.backend.id_to_token(self._eos)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # --- encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) are single tokens.
        `add_special_tokens` adds what the model's post-processor adds (e.g. a BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The chat-templated prompt text (encode it with `add_special_tokens=False`)."""
        from nanoflow_jax.chat import render_chat_template

        return render_chat_template(self._chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns token ids, fed one at a time, into the newly completed text.

    A byte-level token may end inside a multi-byte UTF-8 character; its text then ends in
    U+FFFD and is held back until a later token completes the character. Each step decodes
    only a short window (from the last emitted token boundary), so a long stream stays O(1)
    per token, and the previous token is kept as context because some decoders (e.g.
    SentencePiece's) change a piece's leading space depending on what precedes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the token before the first unemitted one
        self._read = 0    # tokens [0, _read) are emitted

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._step(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back at the end of the stream (e.g. a truncated character, as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]


# ---------------------------------------------------------------- builders


def _build_from_gguf(meta: Mapping[str, Any], where: str, split_digits: bool | None) -> Tokenizer:
    from nanoflow_jax.weights.gguf_file import meta_value

    def typed(key: str, kind: type, default: Any = None, item: type | None = None) -> Any:
        try:
            return meta_value(meta, key, kind, default, item=item, error=TokenizerError)
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from e

    model = typed("tokenizer.ggml.model", str)
    if model is None:
        raise TokenizerError(f"{where} has no tokenizer metadata (tokenizer.ggml.model); pass a tokenizer folder instead")
    if model != "gpt2":
        raise TokenizerError(
            f"{where}: GGUF tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE, is); "
            "point the tokenizer at a Hugging Face folder with tokenizer.json instead")
    tokens: list[str] = typed("tokenizer.ggml.tokens", list, [], item=str)
    if not tokens:
        raise TokenizerError(f"{where} has no token list (tokenizer.ggml.tokens): the file is incomplete or corrupt")
    types: list[int] = typed("tokenizer.ggml.token_type", list, [TOKEN_NORMAL] * len(tokens), item=int)
    _check_token_types(types, len(tokens), where)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _gguf_merges(typed("tokenizer.ggml.merges", list, [], item=str), vocab, where)
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(typed("tokenizer.ggml.pre", str, "default"), split_digits, where)
    backend.decoder = decoders.ByteLevel()
    # Control tokens are special (skipped when decoding); user-defined ones are plain added
    # tokens. Both are matched whole in the input text before BPE runs.
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    backend.add_special_tokens(specials)
    backend.add_tokens(added)

    def opt_id(key: str) -> int | None:
        value = typed(f"tokenizer.ggml.{key}", int)
        if value is not None and not 0 <= value < len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.{key} is {value}, outside the {len(tokens)}-token "
                                 "vocabulary: the file is corrupt")
        return value

    bos, eos = opt_id("bos_token_id"), opt_id("eos_token_id")
    _set_post_processor(backend, tokens, bos if typed("tokenizer.ggml.add_bos_token", bool, False) else None,
                        eos if typed("tokenizer.ggml.add_eos_token", bool, False) else None, where)
    extra = {i for i in (opt_id("eot_token_id"), opt_id("eom_token_id")) if i is not None}
    extra |= _special_eos_ids(backend)
    return Tokenizer(backend, bos_token_id=bos, eos_token_id=eos, extra_eos_token_ids=extra,
                     chat_template=typed("tokenizer.chat_template", str))


def _check_token_types(types: Sequence[int], n_tokens: int, where: str) -> None:
    if len(types) != n_tokens:
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {n_tokens} tokens: "
                             "the file is corrupt")
    bad = next((t for t in types if not TOKEN_UNDEFINED <= t <= TOKEN_BYTE), None)
    if bad is not None:
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type holds {bad}, not a llama.cpp token type "
                             f"({TOKEN_UNDEFINED}..{TOKEN_BYTE}): the file is corrupt")


def _gguf_merges(lines: Sequence[str], vocab: Mapping[str, int], where: str) -> list[tuple[str, str]]:
    """"left right" lines as pairs; each side and their join must be tokens (for a missing join
    the BPE library raises a Rust panic, a BaseException that `except Exception` does not catch)."""
    merges = []
    for i, line in enumerate(lines):
        pair = tuple(line.split(" ", 1))
        if len(pair) != 2 or not all(p in vocab for p in pair) or pair[0] + pair[1] not in vocab:
            raise TokenizerError(f"{where}: tokenizer.ggml.merges[{i}] = {line[:60]!r} is not two tokens whose "
                                 "join is also a token: the file is corrupt")
        merges.append(pair)
    return merges


def _gguf_pre_tokenizer(pre: str, split_digits: bool | None, where: str) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if split_digits or (split_digits is None and pre in _DIGIT_TYPES):
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre in _REGEX_TYPES:
        steps.append(pre_tokenizers.Split(Regex(_REGEX_TYPES[pre]), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        if pre not in _GPT2_TYPES and pre not in _DIGIT_TYPES:
            warnings.warn(f"{where}: unknown GGUF pre-tokenizer {pre!r}; using GPT-2's split rules, so digits "
                          "and whitespace may tokenize differently from the original model", stacklevel=3)
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _set_post_processor(backend: _Backend, tokens: list[str], bos: int | None, eos: int | None,
                        where: str) -> None:
    """Add BOS/EOS on `encode(add_special_tokens=True)` only where the GGUF asks for it."""
    if bos is None and eos is None:
        return

    def eos_piece(seq: int) -> list[str]:
        return [f"{tokens[eos]}:{seq}"] if eos is not None else []

    # Templates as lists of pieces, so a token with a space in it stays one piece.
    single = ([f"{tokens[bos]}:0"] if bos is not None else []) + ["$A:0"] + eos_piece(0)
    pair = single + ["$B:1"] + eos_piece(1)
    special = [(tokens[i], i) for i in {bos, eos} if i is not None]
    try:
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    except Exception as e:  # the library rejects some token texts (e.g. one with a ':') with a bare Exception
        raise TokenizerError(f"{where}: the BOS/EOS tokens {[t for t, _ in special]} cannot be added by a "
                             f"template ({e}); the file's special tokens are corrupt") from e


def _special_eos_ids(backend: _Backend) -> set[int]:
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    ids = (backend.token_to_id(tok) for tok in _EXTRA_EOS_TOKENS)
    return {i for i in ids if i is not None and i in added and added[i].special}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _hf_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():  # newer transformers save the template beside the config
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
