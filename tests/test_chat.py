"""Chat templates: parity with transformers' apply_chat_template and real-world templates, the sandbox
and its resource limits (hostile templates fail fast with one ChatTemplateError), message checks."""

from __future__ import annotations

import gc
import json
import random
import re
import resource
import time
from pathlib import Path
from typing import Any

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoflow_jax.chat import ChatTemplateError, RenderLimits, render_chat_template, validate_messages
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
    with pytest.raises(ChatTemplateError, match=r"unsafe operation .*--no-chat-template"):
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
    # Counted loops keep their metadata, over lists and over lazy filter results alike.
    meta = "{% for m in messages|selectattr('role') %}{{ loop.index }}/{{ loop.length }}{{ '.' if loop.last }}{% endfor %}"
    assert render_chat_template(meta, USER * 3) == "1/32/33/3."
    tree = "{% for n in tree recursive %}({{ n.v }}{{ loop(n.kids) if n.kids }}){% endfor %}"
    assert render_chat_template(tree, USER, tree=[{"v": 1, "kids": [{"v": 2, "kids": []}]}, {"v": 3}]) == "(1(2))(3)"


def test_raise_exception_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", USER)


def test_missing_template_names_the_flag(tok):
    with pytest.raises(ChatTemplateError, match="--no-chat-template"):
        render_chat_template(None, USER)
    with pytest.raises(ChatTemplateError, match="--no-chat-template"):
        Tokenizer(tok.backend, bos_token_id=1, eos_token_id=2).apply_chat_template(USER)


def test_syntax_error_is_reported():
    with pytest.raises(ChatTemplateError, match="not valid jinja2 .*--no-chat-template"):
        render_chat_template("{% for m in messages %}", USER)
    with pytest.raises(ChatTemplateError, match="No filter named 'nope'"):
        render_chat_template("{{ 1 | nope }}", USER)


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


# --- Real-world templates: rendered text as the models expect, and identical to plain jinja2. ---

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Tool-calling style (Qwen2.5 / Llama-3.1 / Mistral v3 idioms): namespace(), tojson, macros, a set block,
# str methods, %-formatting, str.format, ~, selectattr, dictsort|map|join, truncate, break/continue.
TOOLS = """{%- set ns = namespace(system='', last_user=-1) -%}
{%- for m in messages %}{% if m.role == 'system' %}{% set ns.system = ns.system ~ m.content.strip() %}{% endif %}
{%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- macro render_tool(t) -%}
{{ '%s(%s)' % (t.name, t.parameters | dictsort | map('first') | join(', ')) }}: {{ t | tojson }}
{%- endmacro -%}
{{- bos_token }}<|system|>{{ ns.system or 'You are helpful.' }}
{%- if tools %}{{ '\n# Tools (%d)' % tools | length }}
{%- for t in tools %}{{ '\n' ~ loop.index }}. {{ render_tool(t) }}{% endfor %}{% endif %}
{%- set user_count = messages | selectattr('role', 'equalto', 'user') | list | length %}
{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ '\n' }}
{%- if m.role == 'assistant' and m.tool_calls -%}
<|assistant|>{% for c in m.tool_calls %}<call>{{ c | tojson(sort_keys=true) }}</call>{% endfor %}
{%- elif m.role == 'tool' -%}
<|tool|>{{ m.content | trim | truncate(40) }}
{%- else -%}
<|{{ m.role }}|>{{ m.content }}
{%- if loop.index0 == ns.last_user %} [{{ '{}/{}'.format(user_count, messages | length) }}]{% endif %}
{%- endif %}
{%- if loop.index > 20 %}{% break %}{% endif %}
{%- endfor %}
{%- set prompt %}{% if add_generation_prompt %}{{ '\n<|assistant|>' }}{% endif %}{% endset %}{{ prompt }}"""

CONVERSATION = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "21 °C and clear."},
    {"role": "user", "content": "Thanks! <3"},
]
TOOL_SPECS = [{"name": "weather", "description": "Current weather",
               "parameters": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}}}]
PAIR = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}]


def _plain_jinja_render(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """What the same template gives in jinja2's plain sandbox (no limits), as transformers renders it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda v, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        v, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template).render(messages=messages, **variables)


@pytest.mark.parametrize("template, kwargs, expected", [
    (LLAMA3, {"bos_token": "<|begin_of_text|>"},
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
     "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}, "<s>[INST]  Hi  [/INST]Hello!</s>[INST] Bye [/INST]"),
    (QWEN2, {}, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
], ids=["llama3", "mistral", "qwen2"])
def test_real_world_templates(template, kwargs, expected):
    assert render_chat_template(template, PAIR, **kwargs) == expected


def test_tool_template_renders():
    text = render_chat_template(TOOLS, CONVERSATION, bos_token="<s>", tools=TOOL_SPECS)
    assert text == (
        '<s><|system|>Be brief.\n# Tools (1)\n1. weather(city, unit): {"name": "weather", "description": '
        '"Current weather", "parameters": {"city": {"type": "string"}, "unit": {"type": "string", "enum": '
        '["°C", "°F"]}}}\n<|user|>What\'s the weather in Paris?\n<|assistant|><call>{"arguments": {"city": '
        '"Paris", "unit": "°C"}, "name": "weather"}</call>\n<|tool|>{"temp": 21, "sky": "clear"}\n'
        '<|assistant|>21 °C and clear.\n<|user|>Thanks! <3 [2/6]\n<|assistant|>')


def test_mistral_rejects_out_of_order_roles():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template(MISTRAL, [PAIR[1]])


def _long_conversation(turns: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    words = ["alpha", "βeta", "{{ x }}", "%s", "{}", "<|im_end|>", "\n", "  ", "naïve", "🙂", "end."]
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": " ".join(rng.choices(words, k=rng.randint(0, 60)))} for i in range(turns)]


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "tools", "smollm2"])
def test_real_templates_render_as_plain_jinja2(tok, name):
    templates = {"llama3": LLAMA3, "mistral": MISTRAL, "qwen2": QWEN2, "tools": TOOLS, "smollm2": tok.chat_template}
    template = templates[name]
    variables = {"bos_token": "<s>", "eos_token": "</s>", "tools": TOOL_SPECS}
    conversations = [PAIR, _long_conversation(1), _long_conversation(400)]
    if name == "tools":  # the others need str contents and alternating user/assistant turns
        conversations.append(CONVERSATION)
    for messages in conversations:
        for gen in (True, False):
            expected = _plain_jinja_render(template, messages, add_generation_prompt=gen, **variables)
            assert render_chat_template(template, messages, add_generation_prompt=gen, **variables) == expected


# --- Hostile templates: each trips a limit before doing the work, fast and without allocating much. ---

@pytest.fixture
def bounded_cost():
    """Each hostile render must stay cheap: under two seconds, and the process's peak memory
    (ru_maxrss, KiB) may not rise by 300 MB or more."""
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    yield
    assert time.monotonic() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300 * 1024


HOSTILE = {
    # memory
    "str_repeat": ("{{ 'a'*10**10 }}", "a repeated str would hold 10,000,000,000"),
    "list_repeat": ("{{ [0]*10**9 }}", "a repeated list would hold 1,000,000,000"),
    "center_filter": ("{{ 'a'|center(10**10) }}", "'center' filter"),
    "indent_filter": ("{{ 'a\nb'|indent(10**10) }}", "'indent' filter"),
    "center_method": ("{{ 'a'.center(10**10) }}", r"str\.center\(\)"),
    "ljust_method": ("{{ 'a'.ljust(10**10, 'x') }}", r"str\.ljust\(\)"),
    "zfill_method": ("{{ '1'.zfill(10**10) }}", r"str\.zfill\(\)"),
    "expandtabs": ("{{ ('\t'*1000).expandtabs(10**8) }}", r"str\.expandtabs\(\)"),
    "str_format_width": ("{{ '{:>10000000000}'.format(1) }}", r"str\.format result"),
    "str_format_nested_width": ("{{ '{:>{w}}'.format('a', w=10**10) }}", r"str\.format result"),
    "format_map_repeats": ("{{ ('{a}'*100).format_map({'a': 'b'*100000}) }}", r"str\.format result"),
    "format_repr_conversion": ("{{ '{0!r}'.format(['a'*100000]*1000) }}", r"str\.format field"),
    "bytes_percent_width": ("{{ '%10000000000d'.encode() % 1 }}", "%-formatted string"),
    "percent_width": ("{{ '%10000000000d' % 1 }}", "%-formatted string"),
    "percent_star_width": ("{{ '%*d' % (10**10, 1) }}", "%-formatted string"),
    "percent_named_repeats": ("{{ ('%(a)s' * 100000) % {'a': 'b'*100000} }}", "%-formatted string"),
    "format_filter": ("{{ '%10000000000s'|format('a') }}", "'format' filter"),
    "wordwrap_filter": ("{{ ('a '*500000)|wordwrap(1, wrapstring='b'*1000) }}", "'wordwrap' filter"),
    "join_filter": ("{{ range(100000)|join('a'*100000) }}", "'join' filter"),
    "join_method": ("{{ 'x'.join(['a'*100000]*100) }}", r"str\.join\(\)"),
    "replace_filter": ("{{ ('a'*1000000)|replace('', 'b'*1000) }}", "'replace' filter"),
    "replace_method": ("{{ ('a'*1000000).replace('a', 'bbbbb') }}", r"str\.replace\(\)"),
    "translate_method": ("{{ ('a'*100000).translate({97: 'b'*1000}) }}", r"str\.translate\(\)"),
    "to_bytes": ("{{ (1).to_bytes(10**10, 'big') }}", r"int\.to_bytes\(\)"),
    "batch_fill": ("{{ [1]|batch(10**9, 'x')|list }}", "'batch' filter"),
    "slice_groups": ("{{ [1]|slice(10**9)|list }}", "'slice' filter"),
    "sum_of_lists": ("{{ ([[1]*100000]*100000)|sum(start=[]) }}", "a list sum"),
    "strftime_format": ("{{ strftime_now('%c' * 500000) }}", r"strftime_now\(\) got a 1,000,000-character format"),
    "lipsum": ("{{ lipsum(10**9) }}", r"lipsum\(\)"),
    "tojson_indent": ("{{ messages|tojson(indent=10**9) }}", "tojson indent"),
    "tojson_shared_items": ("{{ (['a'*100000]*1000)|tojson }}", "'tojson' filter"),
    "render_shared_items": ("{{ ['a'*1000000]*1000000 }}", "an output value"),
    "tilde_shared_items": ("{% set x = ['a'*100000]*1000 %}{{ x ~ x }}", "~-joined string"),
    "doubling_tilde": ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}", "~-joined string would hold 1,048,576"),
    "doubling_plus": ("{% set ns = namespace(s=['a']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s|length }}", "a list sum would hold 1,048,576"),
    "many_big_values": ("{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + ['a'*900000] %}"
                        "{% endfor %}", "builds more than"),
    "output_flood": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output exceeds"),
    "literal_flood_in_macro": ("{% macro m() %}{% for i in range(100000) %}" + "x" * 100 + "{% endfor %}{% endmacro %}"
                               "{{ m()|length }}", "output exceeds"),
    # time
    "power_tower": ("{{ 2**(2**40) }}", "integer result would have about 1,099,511,627,776 bits"),
    "power_decimal": ("{{ 10**(10**8) }}", "integer result would have about 332,192,809 bits"),
    "repeated_squaring": ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                          "{% endfor %}", "integer result"),
    "nested_range_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           r"more than [\d,]+ loop iterations"),
    "nested_string_loops": ("{% set s = 'a'*100000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
                            r"more than [\d,]+ loop iterations"),
    "exponential_macro": ("{% macro m(k) %}{% if k %}{{ m(k-1) }}{{ m(k-1) }}{% endif %}{% endmacro %}{{ m(60) }}",
                          r"more than [\d,]+ loop iterations and calls"),
    "recursive_loop_fanout": ("{% for x in range(1000) recursive %}{% if loop.depth < 3 %}{{ loop(range(1000)) }}"
                              "{% endif %}{% endfor %}", "loop iterations"),
    "huge_range": ("{{ range(10**7)|list }}", r"range\(\) would hold 10,000,000"),
    "astronomic_range": ("{{ range(10**20) }}", r"range\(\) would hold 100,000,000,000,000,000,000"),
    # raw jinja2/Python errors, each wrapped
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    "undefined": ("{{ foo.bar }}", "undefined value .*'foo' is undefined"),
    "type_error": ("{{ 1 + 'a' }}", "TypeError: unsupported operand"),
    "include": ("{% include 'x.jinja' %}", "no loader"),
    "zero_division": ("{{ 1 // 0 }}", "ZeroDivisionError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_fails_fast(name, bounded_cost):
    template, match = HOSTILE[name]
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat_template(template, USER)
    assert "--no-chat-template" in str(info.value) and "\n" not in str(info.value)


def test_limit_errors_name_the_template_line():
    with pytest.raises(ChatTemplateError, match=r"safety limit \(template line 3\)"):
        render_chat_template("a\nb\n{{ 'a' * 10**10 }}", USER)


def test_deadline_stops_a_long_render(bounded_cost):
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"longer than 0\.2 s"):
        render_chat_template(loops, USER, limits=RenderLimits(max_steps=10**12, timeout_s=0.2))


def test_memory_error_is_wrapped():
    def allocate() -> None:
        raise MemoryError

    with pytest.raises(ChatTemplateError, match="ran out of memory"):
        render_chat_template("{{ allocate() }}", USER, allocate=allocate)


def test_limits_grow_with_the_conversation():
    # A message far over the base size limit still renders through ordinary string building.
    big = [{"role": "user", "content": "x" * 3_000_000}]
    text = render_chat_template(QWEN2, big)
    assert len(text) == 3_000_000 + 108 and text.endswith("<|im_start|>assistant\n")


# --- Fuzz: generated hostile snippets either render or raise ChatTemplateError, quickly. ---

_NUMBERS = ["10**10", "2**40", "100000", "1000", "-1", "0", "3", "10**(10**8)", "2**(2**40)", "True"]
_VALUES = ["'a'", "'ab\\n'", "[0]", "(1, 2)", "'{}'", "'%s'", "messages", "range(1000)", "'a'*100000",
           "{'k': 'v'}", "none", "undefined_name", "loop", "namespace(a=1)", "3.5", "['a'*100000]*100"]
# <v>: a value, <n>: a number, <e>: an expression; each placeholder is filled independently.
_EXPRS = ["<v> * <n>", "<n> * <v>", "<n> ** <n>", "<v> + <v>", "<v> ~ <v>", "<v> % <v>", "<v>|center(<n>)",
          "<v>|indent(<n>)", "<v>|join(<v>)", "<v>|replace('', <v>)", "<v>|format(<v>)", "'%*d' % (<n>, 1)",
          "'{:{}}'.format(1, <n>)", "<v>.center(<n>)", "<v>.zfill(<n>)", "<v>|batch(<n>)|list",
          "<v>|slice(<n>)|list", "range(<n>)|list", "lipsum(<n>)", "<v>|tojson(indent=<n>)", "<v>|tojson",
          "<v>|wordwrap(1, wrapstring=<v>)", "<v>|sum(start=[])", "<v>|truncate(<n>)", "(<v>)[<n>]",
          "<v>.format(<v>)", "(<v>|string).expandtabs(<n>)", "<v>|string|list|unique|join", "<v>|length",
          "<v>.split()|map('center', <n>)|join", "<v>|dictsort", "<v>|items|list", "<v>.__class__"]
_STATEMENTS = ["{{ <e> }}", "{% set x = <e> %}{{ x|length }}", "{% for i in range(<n>) %}{{ <e> }}{% endfor %}",
               "{% set ns = namespace(v=<v>) %}{% for i in range(64) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}"
               "{{ <e> }}",
               "{% for i in <v> %}{% for j in <v> %}{{ <e> }}{% endfor %}{% endfor %}",
               "{% macro m(k) %}{{ <e> }}{% if k %}{{ m(k-1) }}{{ m(k-1) }}{% endif %}{% endmacro %}{{ m(40) }}",
               "{% filter center(<n>) %}{{ <e> }}{% endfilter %}", "{% if <e> %}yes{% endif %}"]


def _hostile_snippet(rng: random.Random) -> str:
    def fill(text: str) -> str:
        for key, choices in (("<e>", _EXPRS), ("<v>", _VALUES), ("<n>", _NUMBERS)):
            while key in text:
                text = text.replace(key, fill(rng.choice(choices)) if key == "<e>" else rng.choice(choices), 1)
        return text

    return fill(rng.choice(_STATEMENTS))


def test_fuzz_hostile_snippets():
    rng = random.Random(0)
    limits = RenderLimits(max_steps=20_000, timeout_s=1.0)
    outcomes = {"rendered": 0, "rejected": 0}
    # The objects earlier tests left in this process go to the permanent generation: a full
    # collection triggered by a render would otherwise scan them all, a pause of a second or
    # more that is this process's history, not the template's cost.
    gc.collect()
    gc.freeze()
    rss0, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    try:
        for _ in range(400):
            template = _hostile_snippet(rng)
            t0 = time.monotonic()
            try:
                render_chat_template(template, USER, limits=limits)
                outcomes["rendered"] += 1
            except ChatTemplateError:
                outcomes["rejected"] += 1
            assert time.monotonic() - t0 < 1.5, template
    finally:
        gc.unfreeze()
    assert min(outcomes.values()) > 40, outcomes  # the mix exercises both paths
    assert time.monotonic() - start < 8
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 500 * 1024  # KiB
