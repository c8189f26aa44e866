"""Chat templates: turn a list of messages into the prompt text a model was trained on.

Templates are jinja2 programs shipped inside model files, i.e. untrusted input, so they run
in jinja2's `ImmutableSandboxedEnvironment`: attribute access to Python internals
(`__class__`, `__globals__`, ...) and mutation of the objects passed in raise
`jinja2.exceptions.SecurityError` instead of running code.

The rendering environment offers what Hugging Face chat templates expect: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, the `raise_exception(msg)` and
`strftime_now(fmt)` functions, a `tojson` filter that keeps non-ASCII text as is, the
`{% break %}`/`{% continue %}` loop controls, and `{% generation %}` blocks (rendered as
their body), with `trim_blocks` and `lstrip_blocks` on.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or the template itself failed."""


NO_TEMPLATE_HINT = ("this model has no chat template: pass --no-chat-template to send the prompt as raw text "
                    "(or give the model a template in its tokenizer_config.json / GGUF metadata)")


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise ChatTemplateError(f"the chat template rejected the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts need the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                        extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid jinja2 (line {e.lineno}): {e.message}") from e


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
                         **extra: Any) -> str:
    """Render `messages` with a model's chat template (sandboxed).

    `extra` become template variables too (e.g. `tools`, `date_string`).
    """
    if not template:
        raise ChatTemplateError(NO_TEMPLATE_HINT)
    msgs = validate_messages(messages)
    compiled = compile_template(template)
    return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
