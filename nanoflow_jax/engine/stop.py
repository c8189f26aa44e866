"""When a request stops: EOS, a stop token, a stop string (which may span tokens), length."""

from __future__ import annotations

from nanoflow_jax.engine.sequence import Sequence


def finish_check(seq: Sequence, token: int, delta: str, eos_ids: frozenset[int]) -> tuple[str, str | int | None] | None:
    """Append `delta` to the request's text; (finish_reason, stop_reason) if it ends here.

    A matched stop string is cut off the text, with everything after it.
    """
    params, old_len = seq.params, len(seq.text)
    seq.text += delta
    if not params.ignore_eos and token in eos_ids:
        return "stop", None
    if token in params.stop_token_ids:
        return "stop", token
    if params.stop and delta:
        # Only the tail can hold a new match: a stop string may straddle tokens.
        search_from = max(0, old_len - max(len(s) for s in params.stop) + 1)
        hits = [(seq.text.find(s, search_from), s) for s in params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            at, s = min(hits)
            seq.text = seq.text[:at]
            return "stop", s
    if len(seq.output_token_ids) >= seq.max_tokens:
        return "length", None
    return None
