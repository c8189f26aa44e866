"""Chat templates: turn a list of messages into the prompt text a model was trained on.

Templates are jinja2 programs shipped inside model files, i.e. untrusted input, so they run
in `template_sandbox.BoundedSandbox`: attribute access to Python internals (`__class__`,
`__globals__`, ...) and mutation of the objects passed in are refused, and sizes, loop steps,
output and render time are bounded, so a hostile template cannot exhaust memory or hang.
Every failure, from compiling or rendering, surfaces as one `ChatTemplateError` that names
the cause and the way out.

The rendering environment offers what Hugging Face chat templates expect: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, the `raise_exception(msg)` and
`strftime_now(fmt)` functions, a `tojson` filter that keeps non-ASCII text as is, the
`{% break %}`/`{% continue %}` loop controls, and `{% generation %}` blocks (rendered as
their body), with `trim_blocks` and `lstrip_blocks` on.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.ext import Extension, loopcontrols

from nanoflow_jax.template_sandbox import (ChatTemplateError, BoundedSandbox, RenderLimits, TemplateLimitError,
                                           render_bounded, template_line)

__all__ = ["ChatTemplateError", "RenderLimits", "TemplateLimitError", "compile_template", "render_chat_template",
           "validate_messages"]

NO_TEMPLATE_HINT = ("this model has no chat template: pass --no-chat-template to send the prompt as raw text "
                    "(or give the model a template in its tokenizer_config.json / GGUF metadata)")


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise ChatTemplateError(f"the chat template rejected the messages: {message}")


_MAX_STRFTIME_FORMAT = 256


def _strftime_now(fmt: str) -> str:
    # Each directive may expand about tenfold ('%c'), so the format itself stays short.
    if len(fmt) > _MAX_STRFTIME_FORMAT:
        raise TemplateLimitError(f"strftime_now() got a {len(fmt):,}-character format "
                                 f"(at most {_MAX_STRFTIME_FORMAT})")
    return datetime.datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part for training masks;
    for inference it is just its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` tag itself
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once (templates of a served model never change)."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of a conversation; return plain-dict copies for the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': str, 'content': str}} dicts, not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...} message")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty str (e.g. 'user'), got {role!r}")
        # An assistant turn that only calls tools may carry no text.
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        out.append(dict(msg))
    return out


def render_chat_template(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                         limits: RenderLimits = RenderLimits(), **extra: Any) -> str:
    """Render `messages` with a model's chat template (sandboxed, within `limits`).

    `extra` become template variables too (e.g. `tools`, `date_string`).
    """
    if not template:
        raise ChatTemplateError(NO_TEMPLATE_HINT)
    variables = dict(messages=validate_messages(messages), add_generation_prompt=add_generation_prompt,
                     bos_token=bos_token, eos_token=eos_token, **extra)
    try:
        return render_bounded(compile_template(template), variables, limits)
    except Exception as e:
        if isinstance(e, ChatTemplateError) and not isinstance(e, TemplateLimitError):
            raise  # raise_exception(): the template's own verdict on the messages
        raise _template_failure(e) from e


_FIX = "pass --no-chat-template to send the prompt as raw text, or give the model a working chat template"


def _template_failure(e: Exception) -> ChatTemplateError:
    """One error naming what went wrong in the template, where, and the way out."""
    if isinstance(e, jinja2.TemplateSyntaxError):
        message = (e.message or "").rstrip(".")
        return ChatTemplateError(f"the chat template is not valid jinja2 (line {e.lineno}): {message}; {_FIX}")
    line, detail = template_line(e), str(e).rstrip(".")
    where = f" (template line {line})" if line is not None else ""
    if isinstance(e, TemplateLimitError):
        cause = f"the chat template exceeds a safety limit{where}: {detail}"
    elif isinstance(e, SecurityError):
        cause = f"the chat template attempted an unsafe operation{where}: {detail}"
    elif isinstance(e, UndefinedError):
        cause = f"the chat template uses an undefined value{where}: {detail}"
    elif isinstance(e, RecursionError):
        cause = f"the chat template recurses too deeply{where}"
    elif isinstance(e, MemoryError):
        cause = f"the chat template ran out of memory{where}"
    else:
        cause = f"the chat template failed{where}: {type(e).__name__}: {detail}"
    return ChatTemplateError(f"{cause}; {_FIX}")
