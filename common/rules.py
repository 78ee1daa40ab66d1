"""Rule expressions (DESIGN §6; mercure §3.4, §3.5), evaluated by a small interpreter over ``ast``.

A rule is a Python *expression* over the tags of a series, in mercure's syntax: ``tags.Modality ==
"CT"``, ``tags["SeriesDescription"]``, the legacy ``@SeriesDescription@`` macro, string methods,
``in``, comparisons, ``and/or/not``, arithmetic and a whitelist of pure functions. The text is
parsed with :func:`ast.parse`, the tree is checked against a whitelist of node types and names,
and the checked tree is walked by :class:`_Evaluator`. Python's ``eval``, ``exec`` and
``compile`` never see it. ``docs/rules.md`` lists the language, the limits and the differences
from mercure.

Contracts:

* :func:`evaluate_rule` never raises for a bad rule or bad data: it returns a :class:`RuleResult`.
  A tag the series lacks makes the rule false (``missing_tag`` says which); a rule that is
  invalid or fails while evaluated is false with ``error`` set to a message for the GUI.
* :func:`validate_rule` / :func:`compile_rule` refuse an invalid rule without evaluating it.
* Every evaluation is bounded: the rule's length, node count and nesting depth, the size of
  every intermediate string, container and integer, the sum of the sizes of everything it
  builds, and the time (a deadline checked at every node, loop step and function call).
  Operations whose cost would exceed a size limit are refused *before* they run (``9**9**9``,
  ``"a" * 10**10``, ``range(10**12)``).
"""

from __future__ import annotations

import ast
import contextvars
import functools
import logging
import math
import operator
import re
import string
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from common.errors import CaduceusError

logger = logging.getLogger(__name__)

MAX_RULE_LENGTH: Final = 10_000
"""Characters of a rule as written."""
MAX_NODES: Final = 5_000
"""Syntax-tree nodes of a rule (operators and load/store markers not counted)."""
MAX_DEPTH: Final = 100
"""Nesting depth of the syntax tree; also bounds the interpreter's recursion."""
MAX_STRING: Final = 1_000_000
"""Characters of any intermediate string."""
MAX_ITEMS: Final = 100_000
"""Elements of a ``range`` or of a list built by a comprehension."""
MAX_WEIGHT: Final = 1_000_000
"""Size of any intermediate container: one per element, plus the characters of its strings and
the decimal digits of its integers, nested containers counted in full (roughly its repr's length).
"""
MAX_TOTAL: Final = 10_000_000
"""Sum of the sizes (as for :data:`MAX_WEIGHT`) of every value one evaluation builds: bounds the
memory a rule can hold at once, which the per-value limits alone do not (a loop of big values)."""
MAX_INT_BITS: Final = 4_096
"""Bits of any intermediate integer (about 1,233 decimal digits)."""
MAX_FACTORIAL: Final = 500
MAX_ROUND_DIGITS: Final = 1_000
MAX_FORMAT_WIDTH: Final = 1_000
"""Largest width or precision in a format specification."""
DEFAULT_TIME_LIMIT: Final = 0.25
"""Seconds one evaluation may take."""


class RuleError(CaduceusError):
    """A rule is invalid, or failed while evaluated. The message is written for the GUI."""


class TagNotFound(Exception):
    """Internal: the rule read a tag the series does not have, so the rule is false (mercure)."""

    def __init__(self, tag: object) -> None:
        super().__init__(f"no such tag {tag!r}")
        self.tag = str(tag)


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one evaluation (what mercure's rule tester shows)."""

    triggered: bool
    """The rule is true for these tags (Python truthiness of ``value``)."""
    value: object = None
    """The raw result; anything but plain data (iterators, functions) is given as a short text."""
    tags_accessed: list[str] = field(default_factory=list)
    """Tags the rule read, in first-access order, by their names in the tag set."""
    error: str | None = None
    """Why the rule is invalid or failed; ``None`` when it evaluated (or a tag was missing)."""
    missing_tag: str | None = None
    """The tag whose absence made the rule false, if that is what happened."""


# ---------------------------------------------------------------------------- time budget


class _Budget:
    """Time and memory one evaluation may use."""

    __slots__ = ("built", "deadline", "limit")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.deadline = time.monotonic() + limit
        self.built = 0

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise RuleError(f"the rule took longer than its time limit of {self.limit:g} s")

    def account(self, size: int) -> None:
        self.built += size
        if self.built > MAX_TOTAL:
            raise RuleError(
                f"the rule built values larger than {MAX_TOTAL:,} elements and characters in total"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "caduceus_rule_budget", default=None
)


def _active_budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise RuleError("rule functions can only be called while a rule is evaluated")
    return budget


# ---------------------------------------------------------------------------- size limits


def _check(value: Any) -> Any:
    """``value`` if it is within the size limits, else :class:`RuleError`. Its size is charged
    to the running evaluation's :class:`_Budget`."""
    if isinstance(value, str):
        size = len(value)
        if size > MAX_STRING:
            raise RuleError(f"a string of {size:,} characters exceeds the limit of {MAX_STRING:,}")
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise RuleError(f"an integer of more than {MAX_INT_BITS:,} bits is not allowed")
        size = 1 + value.bit_length() // 3
    elif type(value) in _CONTAINERS:
        size = _weight(value)
    else:
        return value
    budget = _BUDGET.get()
    if budget is not None:
        budget.account(size)
    return value


_CONTAINERS: Final = frozenset({list, tuple, set, frozenset, dict})
_SCALARS: Final = frozenset({float, bool, type(None), complex})


def _weight(value: Any) -> int:
    """The size of ``value`` as defined for :data:`MAX_WEIGHT`; refuses before exceeding it."""
    total = 0
    stack = [value]
    while stack:
        container = stack.pop()
        items = (
            [*container.keys(), *container.values()] if isinstance(container, dict) else container
        )
        total += 1 + len(items)
        if total > MAX_WEIGHT:
            break
        kinds = set(map(type, items))
        # Homogeneous containers are measured by C loops (map/sum); mixed ones item by item.
        if kinds <= _SCALARS:
            continue
        if kinds == {str}:
            total += sum(map(len, items))
        elif kinds == {int}:
            total += sum(map(int.bit_length, items)) // 3
        elif kinds <= _CONTAINERS:
            stack.extend(items)
        else:
            total += _mixed_weight(items, stack)
        if total > MAX_WEIGHT:
            break
    if total > MAX_WEIGHT:
        raise RuleError(f"a value larger than the limit of {MAX_WEIGHT:,} elements and characters")
    return total


def _mixed_weight(items: Any, stack: list[Any]) -> int:
    total = 0
    for item in items:
        kind = type(item)
        if kind is str:
            total += len(item)
        elif kind is int:
            total += item.bit_length() // 3
        elif kind in _CONTAINERS:
            stack.append(item)
    return total


def _check_repeat(left: Any, right: Any) -> None:
    """Refuse ``sequence * n`` whose result would exceed the limits, before computing it."""
    for seq, count in ((left, right), (right, left)):
        if not isinstance(count, int) or count <= 0:
            continue
        if isinstance(seq, str) and len(seq) * count > MAX_STRING:
            raise RuleError(
                f"repeating a string would exceed the limit of {MAX_STRING:,} characters"
            )
        if type(seq) in (list, tuple) and seq and _weight(seq) * count > MAX_WEIGHT:
            raise RuleError(f"repeating a sequence would exceed the limit of {MAX_WEIGHT:,}")


def _power(base: Any, exponent: Any, modulus: Any = None) -> Any:
    """``base ** exponent`` (``% modulus``), refusing integer results beyond the bit limit."""
    if (
        modulus is None
        and isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise RuleError(f"the result of ** would exceed the limit of {MAX_INT_BITS:,} bits")
    return _check(pow(base, exponent) if modulus is None else pow(base, exponent, modulus))


# ---------------------------------------------------------------------------- format guards

_SPEC_NUMBER = re.compile(r"\d+")


def _check_format_spec(spec: str) -> None:
    if "{" in spec or "}" in spec:
        raise RuleError("nested fields in a format specification are not allowed")
    for digits in _SPEC_NUMBER.findall(spec):
        if len(digits) > 4 or int(digits) > MAX_FORMAT_WIDTH:
            raise RuleError(
                f"a width or precision above {MAX_FORMAT_WIDTH} in a format specification "
                "is not allowed"
            )


def _check_format_string(template: str) -> None:
    """Refuse ``str.format`` templates that reach into objects (``{0.__class__}``, ``{0[x]}``)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RuleError(f"invalid format string: {exc}") from None
    for _literal, name, spec, _conversion in fields:
        if name is None:
            continue
        if "." in name or "[" in name:
            raise RuleError(
                "format fields with attribute or index access ('{0.name}', '{0[key]}') "
                "are not allowed"
            )
        if spec:
            _check_format_spec(spec)


# ---------------------------------------------------------------------------- callables


class _Callable:
    """Every function or method a rule can reach is one of these: it checks the deadline and the
    size of its result. Rules never hold a raw Python callable."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _active_budget().check()
        return _check(self.invoke(args, kwargs))

    def invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<function {self.name}>"


class _Function(_Callable):
    __slots__ = ("impl",)

    def __init__(self, name: str, impl: Callable[..., Any]) -> None:
        super().__init__(name)
        self.impl = impl

    def invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.impl(*args, **kwargs)


class _Method(_Callable):
    __slots__ = ("obj",)

    def __init__(self, obj: Any, name: str) -> None:
        super().__init__(name)
        self.obj = obj

    def invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        guard = _METHOD_GUARDS.get(self.name)
        if guard is not None:
            args = guard(self.obj, args, kwargs)
        return getattr(self.obj, self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<method {type(self.obj).__name__}.{self.name}>"


def _require_callable(func: Any, what: str, *, allow_none: bool = False) -> None:
    if not (isinstance(func, _Callable) or (allow_none and func is None)):
        raise RuleError(f"{what} must be one of the rule functions")


def _width_guard(_obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    width = args[0] if args else kwargs.get("width")
    if isinstance(width, int) and width > MAX_STRING:
        raise RuleError(f"a width above {MAX_STRING:,} characters is not allowed")
    return args


def _replace_guard(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if isinstance(obj, str) and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], args[1]
        if isinstance(new, str) and len(new) > len(old):
            count = obj.count(old) if old else len(obj) + 1
            limit = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if isinstance(limit, int) and limit >= 0:
                count = min(count, limit)
            if len(obj) + count * (len(new) - len(old)) > MAX_STRING:
                raise RuleError(f"replace() would exceed the limit of {MAX_STRING:,} characters")
    return args


def _join_guard(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if len(args) != 1 or kwargs:
        return args
    items = list(args[0])
    lengths = sum(len(item) for item in items if isinstance(item, str))
    if lengths + len(obj) * max(len(items) - 1, 0) > MAX_STRING:
        raise RuleError(f"join() would exceed the limit of {MAX_STRING:,} characters")
    return (items,)


def _format_guard(obj: Any, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> tuple[Any, ...]:
    _check_format_string(obj)
    return args


_METHOD_GUARDS: dict[str, Callable[[Any, tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]] = {
    "center": _width_guard,
    "ljust": _width_guard,
    "rjust": _width_guard,
    "zfill": _width_guard,
    "replace": _replace_guard,
    "join": _join_guard,
    "format": _format_guard,
}

STRING_METHODS: Final = frozenset(
    {
        "capitalize", "casefold", "center", "count", "endswith", "find", "format", "index",
        "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower",
        "isnumeric", "isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower",
        "lstrip", "partition", "removeprefix", "removesuffix", "replace", "rfind", "rindex",
        "rjust", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip",
        "swapcase", "title", "upper", "zfill",
    }
)  # fmt: skip
"""Pure ``str`` methods a rule may call (no ``format_map``, ``encode``, ``translate``...)."""
SEQUENCE_METHODS: Final = frozenset({"count", "index"})
DICT_METHODS: Final = frozenset({"get", "keys", "values", "items"})
_METHODS: Final[dict[type, frozenset[str]]] = {
    str: STRING_METHODS,
    list: SEQUENCE_METHODS,
    tuple: SEQUENCE_METHODS,
    dict: DICT_METHODS,
}
_ALL_METHODS: Final = STRING_METHODS | SEQUENCE_METHODS | DICT_METHODS


def _range(*args: Any) -> range:
    result = range(*args)
    try:
        size = len(result)
    except OverflowError:
        size = MAX_ITEMS + 1
    if size > MAX_ITEMS:
        raise RuleError(f"range() with more than {MAX_ITEMS:,} elements is not allowed")
    return result


def _factorial(number: Any) -> int:
    if isinstance(number, int) and number > MAX_FACTORIAL:
        raise RuleError(f"factorial() of more than {MAX_FACTORIAL} is not allowed")
    return math.factorial(number)


def _round(number: Any, ndigits: Any = None) -> Any:
    if isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise RuleError(f"round() to more than {MAX_ROUND_DIGITS} digits is not allowed")
    return round(number) if ndigits is None else round(number, ndigits)


def _format(value: Any, spec: Any = "") -> str:
    if isinstance(spec, str):
        _check_format_spec(spec)
    return format(value, spec)


def _sum(iterable: Any, start: Any = 0) -> Any:
    if not isinstance(start, int | float):
        raise RuleError("sum() adds numbers only (use ''.join() for strings)")
    return sum(iterable, start)


def _map(func: Any, *iterables: Any) -> Any:
    _require_callable(func, "the function given to map()")
    return map(func, *iterables)


def _filter(func: Any, iterable: Any) -> Any:
    _require_callable(func, "the function given to filter()", allow_none=True)
    return filter(func, iterable)


def _with_key(impl: Callable[..., Any]) -> Callable[..., Any]:
    """``sorted``/``min``/``max``: a ``key`` must be a rule function."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("key") is not None:
            _require_callable(kwargs["key"], f"the key of {impl.__name__}()")
        return impl(*args, **kwargs)

    return checked


_FUNCTION_IMPLS: Final[dict[str, Callable[..., Any]]] = {
    # type constructors
    "bool": bool,
    "int": int,
    "float": float,
    "complex": complex,
    "str": str,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "dict": dict,
    # aggregates and iteration
    "len": len,
    "sum": _sum,
    "min": _with_key(min),
    "max": _with_key(max),
    "abs": abs,
    "all": all,
    "any": any,
    "sorted": _with_key(sorted),
    "reversed": reversed,
    "range": _range,
    "enumerate": enumerate,
    "zip": zip,
    "filter": _filter,
    "map": _map,
    # numbers and characters
    "round": _round,
    "pow": _power,
    "divmod": divmod,
    "chr": chr,
    "ord": ord,
    "hex": hex,
    "oct": oct,
    "bin": bin,
    "format": _format,
    "repr": repr,
    # math
    "sqrt": math.sqrt,
    "ceil": math.ceil,
    "floor": math.floor,
    "log": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "isinf": math.isinf,
    "isnan": math.isnan,
    "fabs": math.fabs,
    "factorial": _factorial,
    "trunc": math.trunc,
}
FUNCTIONS: Final = frozenset(_FUNCTION_IMPLS)
"""Names of the functions a rule may call (mercure's whitelist)."""
CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e}
_BASE_ENV: Final[dict[str, Any]] = {
    **{name: _Function(name, impl) for name, impl in _FUNCTION_IMPLS.items()},
    **CONSTANTS,
}
_KNOWN_NAMES: Final = frozenset({"tags", *_BASE_ENV})
_REFUSED_NAMES: Final = frozenset(
    {
        "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "hasattr", "type",
        "vars", "globals", "locals", "dir", "input", "print", "breakpoint", "help", "id", "hash",
        "isinstance", "issubclass", "iter", "next", "object", "super", "classmethod",
        "staticmethod", "property", "memoryview", "bytearray", "bytes", "exit", "quit",
        "callable", "aiter", "anext", "slice", "ascii",
    }
)  # fmt: skip


# ---------------------------------------------------------------------------- tags


class _Tags:
    """What ``tags`` is inside a rule: tag lookup that records what was read (mercure ``Tags``).

    It deliberately has no attributes a rule can reach: the interpreter maps ``tags.X`` to
    :meth:`attribute` and ``tags[X]`` to :meth:`item` itself.
    """

    __slots__ = ("_lower", "_tags", "accessed")

    def __init__(self, tags: Mapping[str, str]) -> None:
        self._tags = tags
        self._lower: dict[str, str] | None = None
        self.accessed: list[str] = []

    def _read(self, name: str) -> str:
        if name not in self.accessed:
            self.accessed.append(name)
        value = self._tags[name]
        return value if isinstance(value, str) else str(value)

    def item(self, key: object) -> str:
        """``tags["Name"]``: exact name."""
        if isinstance(key, str) and key in self._tags:
            return self._read(key)
        raise TagNotFound(key)

    def attribute(self, name: str) -> str:
        """``tags.Name``: exact name, else the first tag whose name matches ignoring case."""
        if name in self._tags:
            return self._read(name)
        if self._lower is None:
            self._lower = {}
            for key in self._tags:
                self._lower.setdefault(key.lower(), key)
        match = self._lower.get(name.lower())
        if match is None:
            raise TagNotFound(name)
        return self._read(match)

    def __contains__(self, key: object) -> bool:
        return key in self._tags

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tags))

    def __len__(self) -> int:
        return len(self._tags)

    def __repr__(self) -> str:
        return "<tags>"


# ---------------------------------------------------------------------------- static checks

_ALLOWED_NODES: Final[frozenset[type[ast.AST]]] = frozenset(
    {
        ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call,
        ast.keyword, ast.Attribute, ast.Subscript, ast.Slice, ast.Name, ast.Constant, ast.List,
        ast.Tuple, ast.Set, ast.Dict, ast.JoinedStr, ast.FormattedValue, ast.ListComp,
        ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension,
    }
)  # fmt: skip
_REFUSED_NODES: Final[dict[type[ast.AST], str]] = {
    ast.Lambda: "lambda expressions are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.Starred: "unpacking with * is not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}
_BINARY_OPERATORS: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
    ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_,
    ast.BitXor: operator.xor,
}
_REFUSED_OPERATORS: Final[dict[type[ast.AST], str]] = {
    ast.MatMult: "the @ operator is not allowed (is an @Tag@ macro incomplete?)",
    ast.LShift: "bit shifts are not allowed",
    ast.RShift: "bit shifts are not allowed",
}
_UNARY_OPERATORS: Final[dict[type[ast.unaryop], Callable[[Any], Any]]] = {
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}
_COMPARISONS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda left, right: left in right,
    ast.NotIn: lambda left, right: left not in right,
}
_CONSTANT_TYPES: Final = (str, int, float, bool, type(None))
_COMPREHENSIONS: Final = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_MARKERS: Final = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _segment(source: str, node: ast.AST) -> str:
    text = ast.get_source_segment(source, node) or type(node).__name__
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Tuple | ast.List):
        return {name for element in target.elts for name in _target_names(element)}
    raise RuleError("a comprehension may only assign to names (for x in ..., for k, v in ...)")


def _check_tree(tree: ast.Expression, source: str) -> None:
    """Refuse any node, name or attribute outside the language; walks iteratively, so that a
    deep tree is refused by the depth limit rather than by a ``RecursionError``."""
    nodes = 0
    stack: list[tuple[ast.AST, int, frozenset[str]]] = [(tree.body, 1, frozenset())]
    while stack:
        node, depth, bound = stack.pop()
        if isinstance(node, _MARKERS):
            if type(node) in _REFUSED_OPERATORS:
                raise RuleError(_REFUSED_OPERATORS[type(node)])
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise RuleError(f"the rule is too long (more than {MAX_NODES:,} elements)")
        if depth > MAX_DEPTH:
            raise RuleError(f"the rule is nested too deeply (more than {MAX_DEPTH} levels)")
        try:
            _check_node(node, bound)
            if isinstance(node, _COMPREHENSIONS):
                bound = bound | {n for gen in node.generators for n in _target_names(gen.target)}
        except RuleError as exc:
            raise RuleError(f"{exc} (at `{_segment(source, node)}`)") from None
        children = list(ast.iter_child_nodes(node))
        stack.extend((child, depth + 1, bound) for child in reversed(children))  # left first


def _check_node(node: ast.AST, bound: frozenset[str]) -> None:
    if type(node) in _REFUSED_NODES:
        raise RuleError(_REFUSED_NODES[type(node)])
    if type(node) not in _ALLOWED_NODES:
        raise RuleError(f"{type(node).__name__} is not allowed in a rule")
    if isinstance(node, ast.Constant):
        _check_constant(node.value)
    elif isinstance(node, ast.Name):
        _check_name(node.id, bound, node.ctx)
    elif isinstance(node, ast.Attribute):
        _check_attribute(node, bound)
    elif (isinstance(node, ast.Call) and any(kw.arg is None for kw in node.keywords)) or (
        isinstance(node, ast.Dict) and any(key is None for key in node.keys)
    ):
        raise RuleError("unpacking with ** is not allowed")
    elif isinstance(node, ast.comprehension) and node.is_async:
        raise RuleError("async comprehensions are not allowed")


def _check_constant(value: object) -> None:
    if not isinstance(value, _CONSTANT_TYPES):
        raise RuleError(f"{type(value).__name__} literals are not allowed")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise RuleError(f"an integer of more than {MAX_INT_BITS:,} bits is not allowed")


def _check_name(name: str, bound: frozenset[str], ctx: ast.expr_context) -> None:
    if name.startswith("_") and name != "_":
        raise RuleError("names starting with '_' are not allowed")
    if isinstance(ctx, ast.Store) or name in bound or name in _KNOWN_NAMES:
        return
    if name in _REFUSED_NAMES:
        raise RuleError(f"'{name}' is not available in rules")
    raise RuleError(f"unknown name '{name}'; a tag is read as tags.{name} or tags[\"{name}\"]")


def _check_attribute(node: ast.Attribute, bound: frozenset[str]) -> None:
    if node.attr.startswith("_"):
        raise RuleError("attributes starting with '_' are not allowed")
    reads_tag = isinstance(node.value, ast.Name) and node.value.id == "tags"
    if (reads_tag and "tags" not in bound) or node.attr in _ALL_METHODS:
        return
    raise RuleError(f"'.{node.attr}' is not an allowed method")


# ---------------------------------------------------------------------------- the interpreter

_PYTHON_ERRORS: Final = (
    ArithmeticError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    RuntimeError,
    MemoryError,
)
_SUBSCRIPTABLE: Final = (str, list, tuple, dict, range)
_CONVERSIONS: Final[dict[int, Callable[[Any], str]]] = {-1: str, 115: str, 114: repr, 97: ascii}

Env = Mapping[str, Any]
"""The loop variables of the enclosing comprehensions (the global names live in the evaluator)."""


class _Evaluator:
    """Walks a checked tree. Each method handles one node type; :meth:`eval` dispatches, checks
    the deadline and turns a Python exception into a :class:`RuleError` naming the node."""

    def __init__(self, source: str, budget: _Budget, tags: _Tags) -> None:
        self.source = source
        self.budget = budget
        self.globals = {**_BASE_ENV, "tags": tags}

    def eval(self, node: ast.expr, env: Env) -> Any:
        self.budget.check()
        handler = _HANDLERS[type(node)]
        try:
            return handler(self, node, env)
        except _PYTHON_ERRORS as exc:
            detail = str(exc) if len(str(exc)) <= 200 else str(exc)[:197] + "..."
            raise RuleError(
                f"{type(exc).__name__} in `{_segment(self.source, node)}`: {detail}"
            ) from None

    def truth(self, value: Any) -> bool:
        return bool(value)

    def constant(self, node: ast.Constant, env: Env) -> Any:
        return node.value

    def name(self, node: ast.Name, env: Env) -> Any:
        if node.id in env:
            return env[node.id]
        if node.id in self.globals:
            return self.globals[node.id]
        raise RuleError(f"name '{node.id}' is not defined here")

    def attribute(self, node: ast.Attribute, env: Env) -> Any:
        value = self.eval(node.value, env)
        if isinstance(value, _Tags):
            return value.attribute(node.attr)
        if node.attr in _METHODS.get(type(value), ()):
            return _Method(value, node.attr)
        raise RuleError(f"{_type_name(value)} has no method '.{node.attr}' usable in rules")

    def subscript(self, node: ast.Subscript, env: Env) -> Any:
        value = self.eval(node.value, env)
        key = self.eval(node.slice, env)
        if isinstance(value, _Tags):
            return value.item(key)
        if not isinstance(value, _SUBSCRIPTABLE):
            raise RuleError(f"{_type_name(value)} cannot be indexed")
        return _check(value[key])  # a slice is a new value

    def slice(self, node: ast.Slice, env: Env) -> slice:
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if part is None else self.eval(part, env) for part in parts))

    def binop(self, node: ast.BinOp, env: Env) -> Any:
        left = self.eval(node.left, env)
        right = self.eval(node.right, env)
        if isinstance(node.op, ast.Mult):
            _check_repeat(left, right)
        elif isinstance(node.op, ast.Mod) and isinstance(left, str):
            raise RuleError("%-formatting of strings is not supported; use format()")
        return _check(_BINARY_OPERATORS[type(node.op)](left, right))

    def unaryop(self, node: ast.UnaryOp, env: Env) -> Any:
        return _check(_UNARY_OPERATORS[type(node.op)](self.eval(node.operand, env)))

    def boolop(self, node: ast.BoolOp, env: Env) -> Any:
        is_and = isinstance(node.op, ast.And)
        value: Any = None
        for operand in node.values:
            value = self.eval(operand, env)
            if self.truth(value) != is_and:
                return value
        return value

    def compare(self, node: ast.Compare, env: Env) -> Any:
        left = self.eval(node.left, env)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.eval(right_node, env)
            if not self.truth(_COMPARISONS[type(op)](left, right)):
                return False
            left = right
        return True

    def ifexp(self, node: ast.IfExp, env: Env) -> Any:
        branch = node.body if self.truth(self.eval(node.test, env)) else node.orelse
        return self.eval(branch, env)

    def call(self, node: ast.Call, env: Env) -> Any:
        func = self.eval(node.func, env)
        if not isinstance(func, _Callable):
            raise RuleError(f"`{_segment(self.source, node.func)}` is not a function")
        args = [self.eval(arg, env) for arg in node.args]
        kwargs = {str(kw.arg): self.eval(kw.value, env) for kw in node.keywords}
        return func(*args, **kwargs)

    def list_(self, node: ast.List, env: Env) -> Any:
        return _check([self.eval(element, env) for element in node.elts])

    def tuple_(self, node: ast.Tuple, env: Env) -> Any:
        return _check(tuple(self.eval(element, env) for element in node.elts))

    def set_(self, node: ast.Set, env: Env) -> Any:
        return _check({self.eval(element, env) for element in node.elts})

    def dict_(self, node: ast.Dict, env: Env) -> Any:
        pairs = zip(node.keys, node.values, strict=True)
        return _check({self.eval(k, env): self.eval(v, env) for k, v in pairs if k is not None})

    def joinedstr(self, node: ast.JoinedStr, env: Env) -> Any:
        parts: list[str] = []
        size = 0
        for part in node.values:
            text = str(self.eval(part, env))
            size += len(text)
            if size > MAX_STRING:
                raise RuleError(f"a string exceeds the limit of {MAX_STRING:,} characters")
            parts.append(text)
        return "".join(parts)

    def formattedvalue(self, node: ast.FormattedValue, env: Env) -> Any:
        value = self.eval(node.value, env)
        if node.conversion != -1:
            value = _CONVERSIONS[node.conversion](value)
        spec = "" if node.format_spec is None else str(self.eval(node.format_spec, env))
        return _check(_format(value, spec))

    # comprehensions: the loop variables live in a new environment per iteration

    def scopes(self, generators: Sequence[ast.comprehension], env: Env) -> Iterator[Env]:
        """The environment of each iteration of nested ``for ... if ...`` clauses."""
        first, rest = generators[0], generators[1:]
        for item in self.eval(first.iter, env):
            self.budget.check()
            scope = dict(env)
            self.bind(first.target, item, scope)
            if not all(self.truth(self.eval(cond, scope)) for cond in first.ifs):
                continue
            if rest:
                yield from self.scopes(rest, scope)
            else:
                yield scope

    def bind(self, target: ast.expr, value: Any, scope: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            scope[target.id] = value
            return
        assert isinstance(target, ast.Tuple | ast.List)  # guaranteed by _check_tree
        values = list(value)
        if len(values) != len(target.elts):
            raise RuleError(
                f"cannot unpack {len(values)} values into {len(target.elts)} names "
                f"in `{_segment(self.source, target)}`"
            )
        for element, item in zip(target.elts, values, strict=True):
            self.bind(element, item, scope)

    def collect(self, node: ast.ListComp | ast.SetComp, env: Env) -> list[Any]:
        items: list[Any] = []
        for scope in self.scopes(node.generators, env):
            items.append(self.eval(node.elt, scope))
            if len(items) > MAX_ITEMS:
                raise RuleError(f"a comprehension built more than {MAX_ITEMS:,} elements")
        return items

    def listcomp(self, node: ast.ListComp, env: Env) -> Any:
        return _check(self.collect(node, env))

    def setcomp(self, node: ast.SetComp, env: Env) -> Any:
        return _check(set(self.collect(node, env)))

    def dictcomp(self, node: ast.DictComp, env: Env) -> Any:
        result: dict[Any, Any] = {}
        for scope in self.scopes(node.generators, env):
            result[self.eval(node.key, scope)] = self.eval(node.value, scope)
            if len(result) > MAX_ITEMS:
                raise RuleError(f"a comprehension built more than {MAX_ITEMS:,} elements")
        return _check(result)

    def generatorexp(self, node: ast.GeneratorExp, env: Env) -> Any:
        return (self.eval(node.elt, scope) for scope in self.scopes(node.generators, env))


_HANDLERS: Final[dict[type[ast.AST], Callable[[_Evaluator, Any, Env], Any]]] = {
    ast.Constant: _Evaluator.constant,
    ast.Name: _Evaluator.name,
    ast.Attribute: _Evaluator.attribute,
    ast.Subscript: _Evaluator.subscript,
    ast.Slice: _Evaluator.slice,
    ast.BinOp: _Evaluator.binop,
    ast.UnaryOp: _Evaluator.unaryop,
    ast.BoolOp: _Evaluator.boolop,
    ast.Compare: _Evaluator.compare,
    ast.IfExp: _Evaluator.ifexp,
    ast.Call: _Evaluator.call,
    ast.List: _Evaluator.list_,
    ast.Tuple: _Evaluator.tuple_,
    ast.Set: _Evaluator.set_,
    ast.Dict: _Evaluator.dict_,
    ast.JoinedStr: _Evaluator.joinedstr,
    ast.FormattedValue: _Evaluator.formattedvalue,
    ast.ListComp: _Evaluator.listcomp,
    ast.SetComp: _Evaluator.setcomp,
    ast.DictComp: _Evaluator.dictcomp,
    ast.GeneratorExp: _Evaluator.generatorexp,
}


def _type_name(value: Any) -> str:
    if isinstance(value, _Callable):
        return "a function"
    if isinstance(value, _Tags):
        return "tags"
    return type(value).__name__


def _plain(value: Any) -> object:
    """The result as given to callers: plain data as is, anything else as a short text."""
    if value is None or isinstance(value, str | int | float | complex):
        return value
    if isinstance(value, list | tuple | set | frozenset | dict):
        return value
    if isinstance(value, _Tags | _Callable | range):
        return repr(value)
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------- parsing

_MACRO = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)@")


def _expand_macros(expr: str) -> tuple[str, tuple[str, ...]]:
    """Replace mercure's ``@Name@`` by ``tags["Name"]`` outside string literals and comments."""
    out: list[str] = []
    names: list[str] = []
    i, size = 0, len(expr)
    while i < size:
        char = expr[i]
        if char in "'\"":
            end = _string_end(expr, i)
            out.append(expr[i:end])
            i = end
        elif char == "#":
            end = expr.find("\n", i)
            end = size if end < 0 else end
            out.append(expr[i:end])
            i = end
        elif char == "@" and (match := _MACRO.match(expr, i)):
            names.append(match.group(1))
            out.append(f'tags["{match.group(1)}"]')
            i = match.end()
        else:
            out.append(char)
            i += 1
    return "".join(out), tuple(dict.fromkeys(names))


def _string_end(expr: str, start: int) -> int:
    """Index just past the string literal opening at ``start`` (or the end of ``expr``)."""
    quote = expr[start] * 3 if expr.startswith(expr[start] * 3, start) else expr[start]
    i = start + len(quote)
    while i < len(expr):
        if expr[i] == "\\":
            i += 2
        elif expr.startswith(quote, i):
            return i + len(quote)
        else:
            i += 1
    return len(expr)


def _parse(text: str) -> tuple[ast.Expression, str]:
    """Parse an expression; a rule spanning several lines is parsed as if in parentheses."""
    try:
        return _parse_quietly(text), text
    except SyntaxError as exc:
        if "\n" not in text:
            raise
        original = exc
    wrapped = f"(\n{text}\n)"
    try:
        return _parse_quietly(wrapped), wrapped
    except SyntaxError:
        raise original from None


def _parse_quietly(text: str) -> ast.Expression:
    # The parser warns about things like "\d" (an invalid escape, kept as is); whether that is
    # an error must not depend on the process's warning filters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(text, mode="eval")


@dataclass(frozen=True)
class CompiledRule:
    """A checked rule, ready to be evaluated any number of times (thread-safe)."""

    source: str
    """The rule as written."""
    text: str = field(repr=False)
    """What was parsed: macros expanded, perhaps wrapped in parentheses."""
    tree: ast.Expression = field(repr=False, compare=False)
    macros: tuple[str, ...] = ()
    """Tags named by ``@Name@`` macros: the rule is false unless all of them exist (mercure)."""

    def evaluate(
        self, tags: Mapping[str, str], *, time_limit: float = DEFAULT_TIME_LIMIT
    ) -> RuleResult:
        """Evaluate against ``tags``; never raises for a failing rule (see :class:`RuleResult`)."""
        missing = next((name for name in self.macros if name not in tags), None)
        if missing is not None:
            return RuleResult(triggered=False, missing_tag=missing)
        proxy = _Tags(tags)
        budget = _Budget(time_limit)
        token = _BUDGET.set(budget)
        try:
            value = _Evaluator(self.text, budget, proxy).eval(self.tree.body, {})
            triggered = bool(value)
        except TagNotFound as exc:
            return RuleResult(False, None, list(proxy.accessed), None, exc.tag)
        except RuleError as exc:
            return RuleResult(False, None, list(proxy.accessed), str(exc))
        except RecursionError:
            return RuleResult(False, None, list(proxy.accessed), "the rule is nested too deeply")
        finally:
            _BUDGET.reset(token)
        return RuleResult(triggered, _plain(value), list(proxy.accessed))


def compile_rule(expr: str) -> CompiledRule:
    """Parse and check a rule without evaluating it; raises :class:`RuleError` saying why it is
    invalid. Results are cached by the rule's text."""
    if not isinstance(expr, str):
        raise RuleError(f"a rule must be text, not {type(expr).__name__}")
    compiled = _compile_cached(expr)
    if isinstance(compiled, str):
        raise RuleError(compiled)
    return compiled


@functools.lru_cache(maxsize=1024)
def _compile_cached(expr: str) -> CompiledRule | str:
    try:
        return _compile(expr)
    except RuleError as exc:
        return str(exc)


def _compile(expr: str) -> CompiledRule:
    if len(expr) > MAX_RULE_LENGTH:
        raise RuleError(f"the rule is longer than {MAX_RULE_LENGTH:,} characters")
    expanded, macros = _expand_macros(expr)
    expanded = expanded.strip()
    if not expanded:
        raise RuleError("the rule is empty")
    try:
        tree, text = _parse(expanded)
    except SyntaxError as exc:
        raise RuleError(_syntax_message(exc, expanded)) from None
    except (RecursionError, MemoryError, ValueError):
        raise RuleError("the rule is nested too deeply or too complex to parse") from None
    _check_tree(tree, text)
    return CompiledRule(source=expr, text=text, tree=tree, macros=macros)


def _syntax_message(exc: SyntaxError, text: str) -> str:
    where = ""
    if exc.lineno is not None and exc.offset is not None:
        where = f" at column {exc.offset}" if "\n" not in text else f" at line {exc.lineno}"
    return f"syntax error{where}: {exc.msg}"


def validate_rule(expr: str) -> str | None:
    """``None`` when ``expr`` is a valid rule, else why not (for the configuration editor)."""
    try:
        compile_rule(expr)
    except RuleError as exc:
        return str(exc)
    return None


def evaluate_rule(
    expr: str, tags: Mapping[str, str], *, time_limit: float = DEFAULT_TIME_LIMIT
) -> RuleResult:
    """Evaluate the rule ``expr`` against the tags of a series (keyword -> string value).

    Never raises for a bad rule: an invalid rule gives ``error`` (and ``triggered=False``).
    """
    try:
        compiled = compile_rule(expr)
    except RuleError as exc:
        return RuleResult(triggered=False, error=f"invalid rule: {exc}")
    return compiled.evaluate(tags, time_limit=time_limit)


# ---------------------------------------------------------------------------- study completion

_COMPLETION_TOKEN = re.compile(r"\s*(?:('[^']*')|([()])|([A-Za-z_]+)|(\S))")
_COMPLETION_MAX_DEPTH: Final = 50

Completion = tuple[str, Any]
"""A parsed completion expression: ("name", text) | ("and", [..]) | ("or", [..])."""


@functools.lru_cache(maxsize=256)
def _parse_completion(expr: str) -> Completion:
    if not expr.strip():
        raise RuleError("Value cannot be empty")
    if len(expr) > MAX_RULE_LENGTH:
        raise RuleError(f"the expression is longer than {MAX_RULE_LENGTH:,} characters")
    if '"' in expr or "'" not in expr:
        raise RuleError("Series names must be enclosed by '...'")
    if expr.count("'") % 2:
        raise RuleError("Series names not properly enclosed by '...'")
    tokens: list[tuple[str, str]] = []
    for match in _COMPLETION_TOKEN.finditer(expr):
        name, paren, word, other = match.groups()
        if name is not None:
            tokens.append(("name", name[1:-1]))
        elif paren is not None:
            tokens.append((paren, paren))
        elif word is not None and word.lower() in ("and", "or"):
            tokens.append((word.lower(), word))
        else:
            bad = word if word is not None else other
            raise RuleError(f"Invalid entry {bad!r}. Are all series names enclosed by '...'?")
    parser = _CompletionParser(tokens)
    tree = parser.expression(0)
    if parser.pos != len(tokens):
        raise RuleError(f"unexpected {tokens[parser.pos][1]!r}; compare with the example")
    return tree


class _CompletionParser:
    """``expr := term ('or' term)*``, ``term := factor ('and' factor)*``,
    ``factor := 'name' | '(' expr ')'`` — ``and`` binds tighter, as in mercure (Python)."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def expression(self, depth: int) -> Completion:
        terms = [self.term(depth)]
        while self.peek() == "or":
            self.pos += 1
            terms.append(self.term(depth))
        return terms[0] if len(terms) == 1 else ("or", terms)

    def term(self, depth: int) -> Completion:
        factors = [self.factor(depth)]
        while self.peek() == "and":
            self.pos += 1
            factors.append(self.factor(depth))
        return factors[0] if len(factors) == 1 else ("and", factors)

    def factor(self, depth: int) -> Completion:
        kind = self.peek()
        if kind == "name":
            self.pos += 1
            return ("name", self.tokens[self.pos - 1][1].lower())
        if kind == "(":
            if depth >= _COMPLETION_MAX_DEPTH:
                raise RuleError("the expression is nested too deeply")
            self.pos += 1
            inner = self.expression(depth + 1)
            if self.peek() != ")":
                raise RuleError("a '(' is not closed; compare with the example")
            self.pos += 1
            return inner
        found = "the end" if kind is None else repr(self.tokens[self.pos][1])
        raise RuleError(f"expected a series name or '(' but found {found}")


def validate_completion_series(expr: str) -> str | None:
    """``None`` when ``expr`` is a valid study completion expression (mercure §3.5), else why
    not: quoted names (``'...'``), ``and``, ``or`` and parentheses only."""
    try:
        _parse_completion(expr)
    except RuleError as exc:
        return str(exc)
    return None


def evaluate_completion_series(expr: str, received_descriptions: Sequence[str]) -> bool:
    """True when the received series satisfy ``expr``: each quoted name is a case-insensitive
    substring of some received SeriesDescription. As in mercure, nothing received is never
    complete and an empty expression is complete once anything arrived. Raises
    :class:`RuleError` for an invalid expression (:func:`validate_completion_series` says why).
    """
    if not received_descriptions:
        return False
    if not expr.strip():
        return True
    tree = _parse_completion(expr)
    lowered = [description.lower() for description in received_descriptions]
    return _completion_value(tree, lowered)


def _completion_value(tree: Completion, received: list[str]) -> bool:
    kind, payload = tree
    if kind == "name":
        return any(payload in description for description in received)
    values = (_completion_value(item, received) for item in payload)
    return all(values) if kind == "and" else any(values)
