"""When a request stops: a stop string (which may span tokens), EOS, a stop token, length.

The output text never holds a stop string (unless `include_stop_str_in_output`): a match
is cut off with everything after it, whatever else ends the request on the same token.
Before `min_tokens` outputs nothing but the length ends a request.
"""

from __future__ import annotations

from nanoflow_jax.engine.sequence import Sequence

Finish = tuple[str, str | int | None]   # (finish_reason, stop_reason)


def finish_check(seq: Sequence, token: int, delta: str, eos_ids: frozenset[int]) -> Finish | None:
    """Append the token's text `delta`; how the request finishes, if it ends here."""
    params, old_len = seq.params, len(seq.text)
    seq.text += delta
    early = len(seq.output_token_ids) < params.min_tokens   # vLLM: only the length ends it before min_tokens
    stop = None if early else _cut_at_stop(seq, old_len)
    if stop is not None:
        return "stop", stop
    if not early and not params.ignore_eos and token in eos_ids:
        end: Finish | None = ("stop", None)
    elif not early and token in params.stop_token_ids:
        end = ("stop", token)
    elif len(seq.output_token_ids) >= seq.max_tokens:
        end = ("length", None)
    else:
        return None
    if seq.detok is not None:
        # The text held for a partial character ends the output, and may complete a stop string.
        old_len = len(seq.text)
        seq.text += seq.detok.flush()
        stop = _cut_at_stop(seq, old_len)
        if stop is not None:
            return "stop", stop
    return end


def _cut_at_stop(seq: Sequence, old_len: int) -> str | None:
    """The first stop string in `seq.text` (cut there), searching only what text after `old_len` can complete."""
    stops = seq.params.stop
    if not stops or len(seq.text) == old_len:
        return None
    search_from = max(0, old_len - max(len(s) for s in stops) + 1)
    hits = [(at, s) for s in stops if (at := seq.text.find(s, search_from)) >= 0]
    if not hits:
        return None
    at, stop = min(hits)
    seq.text = seq.text[:at + (len(stop) if seq.params.include_stop_str_in_output else 0)]
    return stop
