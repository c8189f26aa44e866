"""Turning one request's prompt into checked token ids (text through the tokenizer)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nanoflow_jax.engine.sampling_params import is_int

Prompt = str | Sequence[int]


def prompt_token_ids(prompt: Any, tokenizer: Any | None, vocab_size: int, add_special_tokens: bool) -> list[int]:
    """Token ids of a str or a sequence of ints; ValueError naming the problem otherwise.

    Nothing is coerced: floats, numeric strings, bytes and bools are errors rather than
    silently becoming other tokens (numpy integer scalars are ints and pass).
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass token ids, or create the "
                             "engine with a tokenizer")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the prompt is not valid Unicode: {prompt[e.start:e.end]!r} at index {e.start} "
                             "(a lone surrogate) has no UTF-8 form; fix the text") from None
        try:
            ids = list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        except Exception as e:   # e.g. a lone surrogate that has no UTF-8 form
            raise ValueError(f"the tokenizer rejected the prompt ({type(e).__name__}: {e}): "
                             "pass valid Unicode text") from None
    elif isinstance(prompt, Mapping):
        raise ValueError(f"a prompt dict needs a 'prompt' (text) or 'prompt_token_ids' key, "
                         f"got keys {sorted(map(str, prompt))}")
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ValueError("a bytes prompt is not token ids: decode it to str, or pass a list of ints")
    else:
        try:
            ids = list(prompt)
        except TypeError:
            raise ValueError(f"a prompt must be a str or a list of int token ids, got "
                             f"{type(prompt).__name__}") from None
        for i, t in enumerate(ids):
            if not is_int(t):
                raise ValueError(f"token id #{i} is {t!r} ({type(t).__name__}): token ids must be ints "
                                 "(not float, str or bool)")
        ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids
