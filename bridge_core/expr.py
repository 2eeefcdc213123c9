"""Size expressions in adapter specs: ``"n_key_value_heads * d_head"``, ``"n_inner or 4 * n_embd"``.

A spec value that names a size is a small arithmetic expression over named values: the
attributes of the HF config (in ``[config.from_hf]``) or the fields of the bridge's
`TransformerBridgeConfig` (in component options and views). Expressions are parsed with
`ast` and checked once; only names (dotted for nested configs), numbers and quoted strings,
``+ - * / // %``, parentheses, unary minus, ``or`` (the first operand that exists and is not
None) and ``a if name else b`` are allowed. Nothing is ever called, and names starting with
``_`` are refused, so a spec can read configuration values and nothing else.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from functools import lru_cache
from typing import Any

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
"""What a lookup returns for a name that does not exist (an `or` then tries the next operand)."""

Lookup = Callable[[str], Any]

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
ALLOWED = "names, numbers, 'strings', + - * / // %, parentheses, unary minus, `or`, `a if b else c`"


class ExpressionError(ValueError):
    """An expression that is not valid in a spec (the message says what is allowed)."""


@lru_cache(maxsize=512)
def parse(text: str) -> ast.expr:
    """Parse and check `text`; the result is cached (specs repeat their expressions).

    Raises:
        ExpressionError: not an expression, or one using something not allowed.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"{text!r} is not an expression ({exc.msg})") from None
    for node in ast.walk(tree):
        _check_node(node, text)
    return tree


def _check_node(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.Name | ast.Attribute):
        part = node.id if isinstance(node, ast.Name) else node.attr
        if part.startswith("_"):
            raise ExpressionError(f"{text!r}: names starting with '_' are not readable ({part!r})")
        if isinstance(node, ast.Attribute) and not isinstance(node.value, ast.Name | ast.Attribute):
            raise ExpressionError(f"{text!r}: only names can have attributes")
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float | str):
            raise ExpressionError(f"{text!r}: only numbers and strings are allowed as literals")
        return
    allowed = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.IfExp, ast.Load, ast.USub, ast.UAdd, ast.Or)
    if isinstance(node, allowed) or type(node) in _BINARY:
        return
    raise ExpressionError(f"{text!r}: {type(node).__name__} is not allowed; use {ALLOWED}")


def names(text: str) -> list[str]:
    """The (dotted) names an expression reads, in order of appearance."""
    tree = parse(text)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    chains = [n for n in ast.walk(tree) if isinstance(n, ast.Name | ast.Attribute)]
    chains.sort(key=lambda n: n.col_offset)
    return [dotted(n) for n in chains if id(n) not in inner]


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    raise ExpressionError(f"not a name: {ast.dump(node)}")


def evaluate(text: str, lookup: Lookup) -> Any:
    """The value of `text`, reading names through `lookup` (MISSING if a name is absent).

    Arithmetic on a missing or None operand gives MISSING; ``a or b`` gives the first
    operand that is neither MISSING nor None.
    """
    return _eval(parse(text), lookup)


def _eval(node: ast.expr, lookup: Lookup) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name | ast.Attribute):
        return lookup(dotted(node))
    if isinstance(node, ast.IfExp):
        test = _eval(node.test, lookup)
        chosen = node.body if test is not MISSING and bool(test) else node.orelse
        return _eval(chosen, lookup)
    if isinstance(node, ast.BoolOp):  # only `or` passes the check
        for value in node.values:
            result = _eval(value, lookup)
            if result is not MISSING and result is not None:
                return result
        return MISSING
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand, lookup)
        if operand is MISSING or operand is None:
            return MISSING
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, lookup), _eval(node.right, lookup)
        if any(v is MISSING or v is None for v in (left, right)):
            return MISSING
        return _BINARY[type(node.op)](left, right)
    raise ExpressionError(f"cannot evaluate {ast.dump(node)}")  # excluded by `parse`


def is_expression(value: Any) -> bool:
    """Whether `value` is a string to evaluate (rather than a literal size)."""
    return isinstance(value, str)


def size(value: Any, lookup: Lookup, what: str) -> int:
    """An integer size from a literal or an expression.

    Raises:
        ExpressionError: the expression reads a name that does not exist, or is not an int.
    """
    result = evaluate(value, lookup) if isinstance(value, str) else value
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    if result is MISSING or not isinstance(result, int) or isinstance(result, bool):
        shown = "a missing name" if result is MISSING else repr(result)
        raise ExpressionError(f"{what} = {value!r} gives {shown}, not an integer size")
    return result
