"""Chat templates: parity with transformers' apply_chat_template, the sandbox, message checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from nanoflow_jax.chat import ChatTemplateError, render_chat_template, validate_messages
from nanoflow_jax.tokenizer import Tokenizer

REF = json.loads((Path(__file__).parent / "fixtures" / "smollm2_tokenizer_reference.json").read_text(encoding="utf-8"))
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.mark.parametrize("chat", REF["chats"], ids=lambda c: f"{len(c['messages'])}msg-gen{int(c['add_generation_prompt'])}")
def test_chatml_matches_transformers(tok, chat):
    assert tok.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"]) == chat["text"]


def test_default_system_prompt_only_without_system_message(tok):
    text = tok.apply_chat_template(USER)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    own = tok.apply_chat_template([{"role": "system", "content": "S"}, *USER], add_generation_prompt=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_templated_prompt_encodes_special_tokens(tok):
    ids = tok.encode(tok.apply_chat_template(USER))
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 2


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ messages.append({'role': 'x'}) }}",   # the immutable sandbox forbids mutating inputs
    "{% set d = {} %}{{ d.update(a=1) }}",
])
def test_sandbox_blocks_python_internals(template):
    with pytest.raises(SecurityError):
        render_chat_template(template, USER)


def test_sandbox_hides_dunder_attributes():
    # A lone unsafe attribute is an undefined value: it renders as nothing, never the object.
    assert render_chat_template("[{{ ''.__class__ }}]", USER) == "[]"


def test_template_helpers():
    assert render_chat_template("{{ messages[0] | tojson }}", [{"role": "user", "content": "é<b>"}]) == \
        '{"role": "user", "content": "é<b>"}'
    assert re.fullmatch(r"\d{4}", render_chat_template("{{ strftime_now('%Y') }}", USER))
    assert render_chat_template("{{ bos_token }}|{{ eos_token }}", USER, bos_token="<s>", eos_token="</s>") == "<s>|</s>"
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat_template(loop, USER * 3) == "hi"
    gen = "{% generation %}{{ messages[-1].content }}{% endgeneration %}!"
    assert render_chat_template(gen, USER) == "hi!"
    assert render_chat_template("{{ tools | length }}", USER, tools=[1, 2]) == "2"


def test_raise_exception_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", USER)


def test_missing_template_names_the_flag(tok):
    with pytest.raises(ChatTemplateError, match="--no-chat-template"):
        render_chat_template(None, USER)
    with pytest.raises(ChatTemplateError, match="--no-chat-template"):
        Tokenizer(tok.backend, bos_token_id=1, eos_token_id=2).apply_chat_template(USER)


def test_syntax_error_is_reported():
    with pytest.raises(ChatTemplateError, match="not valid jinja2"):
        render_chat_template("{% for m in messages %}", USER)


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ({"role": "user", "content": "x"}, "must be a list"),
    ([], "empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "", "content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\] must be a str"),
    ([{"role": "user"}], r"messages\[0\]\['content'\]"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_tool_call_turn_may_have_no_content():
    msgs = [*USER, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert validate_messages(msgs)[1]["tool_calls"] == [{"name": "f"}]
