"""A jinja2 sandbox that bounds what an untrusted template may cost: memory, time and output.

jinja2's `ImmutableSandboxedEnvironment` blocks escapes to Python internals but lets a template
ask for `'a' * 10**10`, `2 ** 2 ** 40` or two nested `range(100000)` loops. `BoundedSandbox`
checks the size of every result that can grow (`*`, `**`, `+`, `%`, `~`, the filters and str
methods that take a width or repeat their input) BEFORE computing it, because Python cannot
interrupt one huge C operation. Loops, calls and output are counted against a step budget, an
output budget and a wall-clock deadline, all checked as the template runs.

Templates render through `render_bounded`, which installs a fresh `_Budget` for the render.
Limits grow with the size of the render's inputs, so long conversations still render.
A limit that trips raises `TemplateLimitError` naming the limit.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MappingView, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import update_wrapper
from typing import Any

import jinja2
from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum
from markupsafe import Markup


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or the template itself failed."""


class TemplateLimitError(ChatTemplateError):
    """Rendering a template would exceed one of its `RenderLimits`."""


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost. Sizes count characters (strings) or items (lists, tuples)."""

    max_size: int = 1_000_000      # one value, plus the size of the render's inputs
    max_output: int = 4_000_000    # all text emitted (macro bodies too), plus 4x the inputs
    max_built: int = 64_000_000    # all values built by operators, filters and calls, plus 16x the inputs
    max_int_bits: int = 10_000     # one integer result
    max_steps: int = 100_000       # loop iterations, calls and filters, plus one per 10 input characters
    timeout_s: float = 5.0


class _Budget:
    """The limits of one render and what it has used so far."""

    def __init__(self, limits: RenderLimits, input_size: int) -> None:
        self.limits = limits
        self.max_size = limits.max_size + input_size
        self.max_output = limits.max_output + 4 * input_size
        self.max_built = limits.max_built + 16 * input_size
        self.max_steps = limits.max_steps + input_size // 10
        self.deadline = time.monotonic() + limits.timeout_s
        self.steps = self.output = self.built = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering takes longer than {self.limits.timeout_s:g} s")

    def step(self, cost: int = 1) -> None:
        self.steps += cost
        if self.steps > self.max_steps:
            raise TemplateLimitError(f"rendering runs more than {self.max_steps:,} loop iterations and calls")
        self.tick()

    def size(self, n: int, what: str) -> None:
        if n > self.max_size:
            raise TemplateLimitError(f"{what} would hold {n:,} characters or items (limit {self.max_size:,})")

    def int_bits(self, bits: float) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateLimitError(f"an integer result would have about {bits:,.0f} bits "
                                     f"(limit {self.limits.max_int_bits:,})")

    def build(self, result: Any) -> None:
        n = _shallow_size(result)
        self.size(n, "a result")
        self.add(n)

    def add(self, n: int) -> None:
        self.built += n
        if self.built > self.max_built:
            raise TemplateLimitError(f"rendering builds more than {self.max_built:,} characters or items in total")

    def emit(self, n: int) -> None:
        self.output += n
        if self.output > self.max_output:
            raise TemplateLimitError(f"the output exceeds {self.max_output:,} characters")
        self.tick()


_BUDGET: ContextVar[_Budget | None] = ContextVar("template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # e.g. constant folding at compile time: defer the work to the checked render
        raise TemplateLimitError("a BoundedSandbox template renders only through render_bounded()")
    return budget


_SEQUENCES = (str, bytes, list, tuple)


def _shallow_size(value: Any) -> int:
    if isinstance(value, (*_SEQUENCES, dict)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


def rendered_size(value: Any, cap: int) -> int:
    """About len(str(value)) without building it (exact for str); stops counting past `cap`."""
    total, stack = 0, [value]
    while stack and total <= cap:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset, dict, MappingView, Namespace)):
            if isinstance(v, Namespace):
                v = object.__getattribute__(v, "_Namespace__attrs")
            total += 2 + 4 * len(v)  # brackets, separators, quotes
            if total <= cap:
                stack.extend(v.items() if isinstance(v, dict) else v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() * 10 // 33 + 2  # decimal digits and a sign
        else:
            total += 32  # floats, None, undefined values and other short reprs
    return total


def _arg(args: tuple, kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _width(value: Any) -> int:
    # Widths may come as int or (indent) as a str to repeat; anything else fails in the callee.
    return len(value) if isinstance(value, str) else max(value, 0) if isinstance(value, int) else 0


_PRINTF_SPEC = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?"
                          r"[hlL]?(?P<conv>.)", re.S)
_DIGITS = re.compile(r"\d+")


def _number(digits: str, cap: int) -> int:
    return int(digits) if len(digits) <= 12 else cap + 1


def printf_size(fmt: str, values: Any, cap: int) -> int:
    """An upper estimate of len(fmt % values): widths, precisions and the formatted values."""
    args = values if isinstance(values, tuple) else (values,)
    total, pos = len(fmt), 0
    for m in _PRINTF_SPEC.finditer(fmt):
        if m["conv"] == "%":
            continue
        for part in (m["width"], m["prec"]):
            if part == "*":
                total += _width(args[pos]) if pos < len(args) else 0
                pos += 1
            elif part:
                total += _number(part, cap)
        if m["key"] is not None and isinstance(values, Mapping):
            value = values.get(m["key"])
        else:
            value, pos = (args[pos] if pos < len(args) else None), pos + 1
        total += rendered_size(value, cap) + (320 if isinstance(value, float) else 0)  # '%f' of 1e308
        if total > cap:
            break
    return total


class _BoundedFormatter(SandboxedFormatter):
    """str.format with each field's width, precision and value size checked before formatting."""

    _total = 0  # characters produced so far by the current vformat call

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        # '{0!r}' builds the repr before format_field sees the value.
        if conversion:
            budget = _budget()
            budget.size(rendered_size(value, budget.max_size), "a str.format field")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = _budget()
        cap = budget.max_size
        n = rendered_size(value, cap) + sum(_number(d, cap) for d in _DIGITS.findall(format_spec))
        self._total += n + (320 if isinstance(value, float) else 0)  # '{:f}' of 1e308
        budget.size(self._total, "a str.format result")
        budget.add(n)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


def _check_str_method(budget: _Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the str/bytes/int methods whose result can outgrow their inputs."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if isinstance(owner, (str, bytes)):
        n = len(owner)
        if name in ("center", "ljust", "rjust", "zfill"):
            budget.size(n + _width(_arg(args, kwargs, 0, "width", 0)), f"str.{name}()")
        elif name == "expandtabs":
            budget.size(n * max(_width(_arg(args, kwargs, 0, "tabsize", 8)), 1), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            budget.size(_replaced_size(owner, args[0], args[1], _arg(args, kwargs, 2, "count", -1)), "str.replace()")
        elif name == "join" and args:
            items = list(args[0])  # consumed once here, so its size is known before joining
            budget.size(sum(rendered_size(i, budget.max_size) for i in items) + n * len(items), "str.join()")
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], Mapping):
            most = max((_width(v) for v in args[0].values()), default=1)
            budget.size(n * max(most, 1), "str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        budget.size(_width(_arg(args, kwargs, 0, "length", 1)), "int.to_bytes()")
    return args


def _replaced_size(s: Any, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(s, (str, bytes)) and isinstance(old, type(s)) and isinstance(new, type(s))):
        return 0  # the call itself rejects mismatched types
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _bounded(budget: _Budget, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        budget.step()
        yield item


class _BoundedIterable:
    """A loop's iterable with each iteration counted; keeps len() for loop.length/loop.last."""

    __slots__ = ("_iterable",)

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return _bounded(_budget(), self._iterable)

    def __len__(self) -> int:
        return len(self._iterable)


class _BoundedCodeGenerator(CodeGenerator):
    """Routes loops, `~` joins and literal text through the budget checks."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iterable"), [loop.iter], [], None, None,
                                   lineno=loop.iter.lineno)
        for out in node.find_all(nodes.Output):
            # Literal text becomes a constant expression, so it passes `finalize` and counts as output.
            out.nodes = [nodes.Const(c.data, lineno=c.lineno) if isinstance(c, nodes.TemplateData) else c
                         for c in out.nodes]
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    budget = _budget()
    n = len(value) if isinstance(value, str) else rendered_size(value, budget.max_size)
    budget.size(n, "an output value")
    budget.emit(n)
    return value


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Plain JSON (jinja2's own tojson escapes <, >, & and ' for HTML), built chunk by chunk so the
    # size limit stops it early; indents stay small because each line repeats one per nesting level.
    if _width(indent) > 64:
        raise TemplateLimitError(f"tojson indent {_width(indent):,} is too wide (at most 64)")
    budget, out, n = _budget(), [], 0
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for chunk in encoder.iterencode(value):
        n += len(chunk)
        budget.size(n, "tojson output")
        out.append(chunk)
    return "".join(out)


@pass_context
def _sum(context: Context, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
    # Each addition goes through the checked `+`, so summing lists or strings stays bounded.
    env = context.environment
    if attribute is not None:
        iterable = map(make_attrgetter(env, attribute), iterable)
    total = start
    for item in iterable:
        total = env.call_binop(context, "+", total, item)
    return total


def _range(*args: int) -> range:
    # Ranges are lazy, but `range(n)|list` and friends are not: bound them like any other value.
    rng = range(*args)
    n = (rng.stop - rng.start + rng.step - (1 if rng.step > 0 else -1)) // rng.step
    _budget().size(max(n, 0), "range()")
    return rng


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja's names)
    _budget().size(_width(n) * _width(max) * 16, "lipsum()")
    return generate_lorem_ipsum(n, html, min, max)


# Filters that turn their input into text: its rendered size is checked before they run.
_TEXT_FILTERS = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower",
                           "replace", "safe", "string", "striptags", "title", "tojson", "trim", "truncate",
                           "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"})


def _check_filter(budget: _Budget, name: str, value: Any, args: tuple, kwargs: dict) -> Any:
    """Size checks run before a filter; returns the value to filter (a list where it was consumed)."""
    cap = budget.max_size
    size = rendered_size(value, cap) if name in _TEXT_FILTERS else 0
    budget.size(size, f"the input of the '{name}' filter")
    if name == "center":
        budget.size(size + _width(_arg(args, kwargs, 0, "width", 80)), "the 'center' filter's result")
    elif name == "indent":
        lines = str(value).count("\n") + 1
        budget.size(size + lines * _width(_arg(args, kwargs, 0, "width", 4)), "the 'indent' filter's result")
    elif name == "wordwrap":
        wrap = _arg(args, kwargs, 2, "wrapstring", None)
        budget.size(size + (size + 1) * max(_width(wrap), 1), "the 'wordwrap' filter's result")
    elif name == "replace" and len(args) >= 2:
        budget.size(_replaced_size(str(value), str(args[0]), str(args[1]), _arg(args, kwargs, 2, "count", -1)),
                    "the 'replace' filter's result")
    elif name == "format":
        budget.size(printf_size(str(value), kwargs or args, cap), "the 'format' filter's result")
    elif name == "join":
        value = list(value)  # consumed once here, so its size is known before joining
        sep = rendered_size(_arg(args, kwargs, 0, "d", ""), cap)
        budget.size(sum(rendered_size(v, cap) for v in value) + sep * len(value), "the 'join' filter's result")
    elif name in ("batch", "slice"):
        budget.size(_width(_arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 0)),
                    f"the '{name}' filter's groups")
    return value


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    lead = {_PassArg.context: lambda c: (c,), _PassArg.eval_context: lambda c: (c.eval_ctx,),
            _PassArg.environment: lambda c: (c.environment,)}.get(_PassArg.from_obj(func), lambda c: ())

    # pass_context also keeps jinja2 from folding the filter at compile time, outside any budget.
    @pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        value = _check_filter(budget, name, value, args, kwargs)
        result = func(*lead(context), value, *args, **kwargs)
        budget.build(result)
        return result

    bounded.__name__ = bounded.__qualname__ = f"bounded_{name}"
    return bounded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """`ImmutableSandboxedEnvironment` plus the size, step, output and time limits of `_Budget`."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(autoescape=False, finalize=_finalize, **options)
        self.filters.pop("pprint")  # its output grows with nesting depth times width: no cheap bound
        self.filters.update({"tojson": _tojson, "sum": _sum})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(range=_range, lipsum=_lipsum)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and isinstance(n, int):
                    budget.size(len(seq) * max(n, 0), f"a repeated {type(seq).__name__}")
            if isinstance(left, int) and isinstance(right, int):
                budget.int_bits(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                budget.int_bits(right * math.log2(abs(left)))
        elif operator == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                budget.size(len(left) + len(right), f"a {type(left).__name__} sum")
        elif operator == "%" and isinstance(left, (str, bytes)):
            fmt = left if isinstance(left, str) else left.decode("latin-1")
            budget.size(printf_size(fmt, right, budget.max_size), "a %-formatted string")
        result = self.binop_table[operator](left, right)
        budget.build(result)
        return result

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        # A macro or recursive-loop call costs about as much as ten loop iterations.
        budget.step(10 if isinstance(obj, (Macro, LoopContext)) else 1)
        if isinstance(obj, LoopContext) and args:  # `loop(children)` in a recursive loop
            args = (_BoundedIterable(args[0]), *args[1:])
        else:
            args = _check_str_method(budget, obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        budget.build(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:
            return None
        text: str = value.__self__
        formatter = (_BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup)
                     else _BoundedFormatter(self))
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one mapping argument")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return update_wrapper(wrapper, value)

    def bounded_iterable(self, iterable: Any) -> _BoundedIterable:
        return _BoundedIterable(iterable)

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        budget = _budget()
        budget.size(sum(rendered_size(p, budget.max_size) for p in parts), "a ~-joined string")
        result = "".join([p if isinstance(p, str) else str(p) for p in parts])
        budget.build(result)
        return result


def render_bounded(template: jinja2.Template, variables: dict[str, Any], limits: RenderLimits) -> str:
    """Render a `BoundedSandbox` template within `limits` (scaled by the size of `variables`)."""
    token = _BUDGET.set(_Budget(limits, rendered_size(variables, 1 << 62)))
    try:
        return "".join(template.root_render_func(template.new_context(variables)))
    finally:
        _BUDGET.reset(token)


def template_line(exc: BaseException) -> int | None:
    """The template line the exception was raised at (innermost template frame), if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if isinstance(template, jinja2.Template):
            line = template.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line
