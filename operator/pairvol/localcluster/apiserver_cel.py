"""A small evaluator for the CEL subset used in ``x-kubernetes-validations`` rules.

Why: the real API server enforces CRD validation rules written in CEL (most importantly
``self == oldSelf`` for immutable fields such as ``spec.size``). There is no CEL library
among our dependencies, and the emulator must not be more lenient than Kubernetes on the
rules our own CRDs use, so this module implements a compact, pure interpreter.

Supported: literals (int, double, string, bool, null, lists), ``self``/``oldSelf``, field
selection, indexing, ``has(x.f)``, ``size()``, ``int()``, ``string()``, ``double()``,
methods ``size``, ``startsWith``, ``endsWith``, ``contains``, ``matches``, the macros
``all``/``exists``/``exists_one`` on lists and maps, Kubernetes' quantity library
(``quantity()``, ``isQuantity()`` and the methods ``isInteger``, ``asInteger``,
``compareTo``, ``isGreaterThan``, ``isLessThan``, ``sign``, ``add``, ``sub``,
``asApproximateFloat``: sizes compared by value, so ``268435456`` equals ``256Mi``),
operators ``! - * / % + < <= > >= == != in && ||`` and ``?:``. Anything else fails at
compile time with :class:`CELError`, so a CRD using an unsupported feature is rejected
when it is registered instead of being silently accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pairvol.api.quantity import QuantityError, parse_quantity
from pairvol.errors import PairvolError

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>\d+\.\d+|\d+)
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>==|!=|<=|>=|&&|\|\||[-+*/%<>!?:.,()\[\]])
    )""",
    re.VERBOSE,
)

_BINARY_PRECEDENCE = {
    "||": 1,
    "&&": 2,
    "==": 3,
    "!=": 3,
    "<": 3,
    "<=": 3,
    ">": 3,
    ">=": 3,
    "in": 3,
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
}
_FUNCTIONS = {"has", "size", "int", "string", "double", "quantity", "isQuantity"}
_QUANTITY_METHODS = {
    "isInteger",
    "asInteger",
    "compareTo",
    "isGreaterThan",
    "isLessThan",
    "sign",
    "add",
    "sub",
    "asApproximateFloat",
}
_METHODS = {"size", "startsWith", "endsWith", "contains", "matches", *_QUANTITY_METHODS}
_INT64 = range(-(2**63), 2**63)
_MACROS = {"all", "exists", "exists_one"}


class CELError(PairvolError):
    """A rule could not be compiled or evaluated."""


@dataclass(frozen=True)
class Quantity:
    """A CEL ``Quantity`` value: compared by its exact value (``1Ki`` == ``1024``)."""

    value: Decimal

    def is_integer(self) -> bool:
        return self.value == self.value.to_integral_value() and int(self.value) in _INT64


class _Absent:
    """Marker for a field that is not set (``has()`` is false)."""


ABSENT = _Absent()


@dataclass(frozen=True)
class _Node:
    kind: str
    value: Any = None
    args: tuple[_Node, ...] = ()


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CELError(f"unexpected character {text[pos:].strip()[:1]!r} at offset {pos}")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    tokens.append(("end", ""))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos]

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.tokens[self.pos]
        if value is not None and tok[1] != value:
            raise CELError(f"expected {value!r}, found {tok[1] or 'end of rule'!r}")
        self.pos += 1
        return tok

    def parse(self) -> _Node:
        node = self.expr()
        if self.peek()[0] != "end":
            raise CELError(f"unexpected {self.peek()[1]!r} after a complete expression")
        return node

    def expr(self) -> _Node:
        cond = self.binary(1)
        if self.peek()[1] == "?":
            self.take("?")
            yes = self.expr()
            self.take(":")
            no = self.expr()
            return _Node("cond", None, (cond, yes, no))
        return cond

    def binary(self, min_prec: int) -> _Node:
        left = self.unary()
        while True:
            kind, val = self.peek()
            prec = _BINARY_PRECEDENCE.get(val) if kind in ("op", "id") else None
            if prec is None or prec < min_prec:
                return left
            self.take()
            right = self.binary(prec + 1)
            left = _Node("bin", val, (left, right))

    def unary(self) -> _Node:
        val = self.peek()[1]
        if val in ("!", "-") and self.peek()[0] == "op":
            self.take()
            return _Node("un", val, (self.unary(),))
        return self.postfix()

    def postfix(self) -> _Node:
        node = self.primary()
        while True:
            val = self.peek()[1]
            if val == ".":
                self.take()
                kind, name = self.take()
                if kind != "id":
                    raise CELError(f"expected a field or method name after '.', found {name!r}")
                if self.peek()[1] == "(":
                    self.take("(")
                    args = self.arglist()
                    if name in _MACROS:
                        if len(args) != 2 or args[0].kind != "ident":
                            raise CELError(f"{name}() takes a variable name and a predicate")
                        node = _Node("macro", name, (node, *args))
                    elif name in _METHODS:
                        node = _Node("method", name, (node, *args))
                    else:
                        raise CELError(f"method {name}() is not supported by this emulator")
                else:
                    node = _Node("select", name, (node,))
            elif val == "[":
                self.take()
                index = self.expr()
                self.take("]")
                node = _Node("index", None, (node, index))
            else:
                return node

    def arglist(self) -> tuple[_Node, ...]:
        args: list[_Node] = []
        if self.peek()[1] != ")":
            args.append(self.expr())
            while self.peek()[1] == ",":
                self.take()
                args.append(self.expr())
        self.take(")")
        return tuple(args)

    def primary(self) -> _Node:
        kind, val = self.take()
        if kind == "num":
            return _Node("lit", float(val) if "." in val else int(val))
        if kind == "str":
            return _Node("lit", bytes(val[1:-1], "utf-8").decode("unicode_escape"))
        if kind == "id":
            if val in ("true", "false"):
                return _Node("lit", val == "true")
            if val == "null":
                return _Node("lit", None)
            if self.peek()[1] == "(":
                if val not in _FUNCTIONS:
                    raise CELError(f"function {val}() is not supported by this emulator")
                self.take("(")
                args = self.arglist()
                if val == "has" and (len(args) != 1 or args[0].kind != "select"):
                    raise CELError("has() takes one field selection, e.g. has(self.spec)")
                return _Node("call", val, args)
            return _Node("ident", val)
        if val == "(":
            node = self.expr()
            self.take(")")
            return node
        if val == "[":
            items = []
            if self.peek()[1] != "]":
                items.append(self.expr())
                while self.peek()[1] == ",":
                    self.take()
                    items.append(self.expr())
            self.take("]")
            return _Node("list", None, tuple(items))
        raise CELError(f"unexpected {val or 'end of rule'!r}")


@dataclass(frozen=True)
class Rule:
    """A compiled rule; ``transition`` rules reference ``oldSelf``."""

    source: str
    tree: _Node
    transition: bool

    def evaluate(self, self_value: Any, old_value: Any = ABSENT) -> bool:
        env = {"self": self_value, "oldSelf": old_value}
        result = _eval(self.tree, env)
        if not isinstance(result, bool):
            raise CELError(f"rule {self.source!r} evaluated to {result!r}, not a bool")
        return result


def _uses_old_self(node: _Node) -> bool:
    if node.kind == "ident" and node.value == "oldSelf":
        return True
    return any(_uses_old_self(a) for a in node.args)


def compile_rule(source: str) -> Rule:
    """Parse a CEL rule; raise :class:`CELError` saying what is unsupported."""
    try:
        tree = _Parser(source).parse()
    except CELError as exc:
        raise CELError(f"rule {source!r}: {exc}") from None
    return Rule(source, tree, _uses_old_self(tree))


def _select(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        if name not in value:
            raise CELError(f"no such key: {name}")
        return value[name]
    raise CELError(f"cannot select field {name!r} of {type(value).__name__}")


def _size(value: Any) -> int:
    if isinstance(value, str | list | dict):
        return len(value)
    raise CELError(f"size() of {type(value).__name__} is undefined")


def _eval(node: _Node, env: dict[str, Any]) -> Any:
    k = node.kind
    if k == "lit":
        return node.value
    if k == "list":
        return [_eval(a, env) for a in node.args]
    if k == "ident":
        if node.value not in env:
            raise CELError(f"undeclared reference to {node.value!r}")
        value = env[node.value]
        if value is ABSENT:
            raise CELError(f"{node.value} is not set")
        return value
    if k == "select":
        return _select(_eval(node.args[0], env), node.value)
    if k == "index":
        base, idx = _eval(node.args[0], env), _eval(node.args[1], env)
        try:
            return base[idx]
        except (KeyError, IndexError, TypeError):
            raise CELError(f"index {idx!r} out of range or invalid") from None
    if k == "cond":
        return _eval(node.args[1] if _truth(_eval(node.args[0], env)) else node.args[2], env)
    if k == "un":
        v = _eval(node.args[0], env)
        return (not _truth(v)) if node.value == "!" else -v
    if k == "bin":
        return _binary(node, env)
    if k == "call":
        return _call(node, env)
    if k == "method":
        return _method(node, env)
    if k == "macro":
        return _macro(node, env)
    raise CELError(f"cannot evaluate {k}")  # pragma: no cover - parser never builds others


def _truth(value: Any) -> bool:
    if not isinstance(value, bool):
        raise CELError(f"expected a bool, got {value!r}")
    return value


def _binary(node: _Node, env: dict[str, Any]) -> Any:
    op = node.value
    if op == "&&":
        return _truth(_eval(node.args[0], env)) and _truth(_eval(node.args[1], env))
    if op == "||":
        return _truth(_eval(node.args[0], env)) or _truth(_eval(node.args[1], env))
    a, b = _eval(node.args[0], env), _eval(node.args[1], env)
    ops: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda x, y: x == y,
        "!=": lambda x, y: x != y,
        "<": lambda x, y: x < y,
        "<=": lambda x, y: x <= y,
        ">": lambda x, y: x > y,
        ">=": lambda x, y: x >= y,
        "in": lambda x, y: x in y,
        "+": lambda x, y: x + y,
        "-": lambda x, y: x - y,
        "*": lambda x, y: x * y,
        "/": lambda x, y: x // y if isinstance(x, int) and isinstance(y, int) else x / y,
        "%": lambda x, y: x % y,
    }
    try:
        return ops[op](a, b)
    except (TypeError, ZeroDivisionError) as exc:
        raise CELError(f"{op} on {a!r} and {b!r}: {exc}") from None


def _call(node: _Node, env: dict[str, Any]) -> Any:
    name = node.value
    if name == "has":
        sel = node.args[0]
        base = _eval(sel.args[0], env)
        return isinstance(base, dict) and sel.value in base
    if len(node.args) != 1:
        raise CELError(f"{name}() takes exactly one argument")
    arg = _eval(node.args[0], env)
    if name in ("quantity", "isQuantity"):
        if not isinstance(arg, str):
            raise CELError(f"{name}() needs a string, got {type(arg).__name__}")
        try:
            q = Quantity(parse_quantity(arg))
        except QuantityError as exc:
            if name == "isQuantity":
                return False
            raise CELError(f"quantity({arg!r}): {exc}") from None
        return True if name == "isQuantity" else q
    try:
        if name == "size":
            return _size(arg)
        if name == "int":
            return int(arg)
        if name == "double":
            return float(arg)
        return str(arg).lower() if isinstance(arg, bool) else str(arg)
    except ValueError as exc:
        raise CELError(f"{name}({arg!r}): {exc}") from None


def _method(node: _Node, env: dict[str, Any]) -> Any:
    target = _eval(node.args[0], env)
    args = [_eval(a, env) for a in node.args[1:]]
    name = node.value
    if name == "size":
        return _size(target)
    if name in _QUANTITY_METHODS:
        return _quantity_method(name, target, args)
    if not isinstance(target, str) or len(args) != 1 or not isinstance(args[0], str):
        raise CELError(f"{name}() needs a string receiver and one string argument")
    if name == "startsWith":
        return target.startswith(args[0])
    if name == "endsWith":
        return target.endswith(args[0])
    if name == "contains":
        return args[0] in target
    return re.search(args[0], target) is not None  # matches (RE2 ~ Python re for our rules)


def _quantity_method(name: str, target: Any, args: list[Any]) -> Any:
    if not isinstance(target, Quantity):
        raise CELError(f"{name}() needs a Quantity receiver, got {type(target).__name__}")
    if name in ("compareTo", "isGreaterThan", "isLessThan", "add", "sub"):
        if len(args) != 1 or not isinstance(args[0], Quantity | int):
            raise CELError(f"{name}() takes one Quantity")
        other = args[0].value if isinstance(args[0], Quantity) else Decimal(args[0])
        if name == "add":
            return Quantity(target.value + other)
        if name == "sub":
            return Quantity(target.value - other)
        cmp = (target.value > other) - (target.value < other)
        return cmp if name == "compareTo" else cmp == (1 if name == "isGreaterThan" else -1)
    if args:
        raise CELError(f"{name}() takes no arguments")
    if name == "isInteger":
        return target.is_integer()
    if name == "asInteger":
        if not target.is_integer():
            raise CELError(f"cannot convert quantity {target.value} to an int64 integer")
        return int(target.value)
    if name == "sign":
        return (target.value > 0) - (target.value < 0)
    return float(target.value)  # asApproximateFloat


def _macro(node: _Node, env: dict[str, Any]) -> Any:
    target = _eval(node.args[0], env)
    var = node.args[1].value
    pred = node.args[2]
    items = list(target) if isinstance(target, list | dict) else None
    if items is None:
        raise CELError(f"{node.value}() needs a list or map, got {type(target).__name__}")
    results = [_truth(_eval(pred, {**env, var: item})) for item in items]
    if node.value == "all":
        return all(results)
    if node.value == "exists":
        return any(results)
    return results.count(True) == 1
