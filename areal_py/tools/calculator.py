"""A safe arithmetic evaluator: the ``calculator`` tool.

The input is parsed with :mod:`ast` and only this grammar is evaluated::

    expr := number | ( expr ) | -expr | +expr | expr op expr
    op   := +  -  *  /  //  %  **
    number := an int or float literal (``1_000``, ``2.5``, ``1e3``); no bool, complex or string

No names, calls, attributes, subscripts or comparisons, so nothing but arithmetic can run.
Semantics are Python's: ints are exact and unbounded up to the size limit, ``/`` is true
division (``6/2`` is ``3.0``), ``//`` and ``%`` floor. Limits, checked before the work is done:

- the expression is at most ``MAX_CHARS`` characters;
- an integer result (or operand of ``*`` or ``**``) has at most ``MAX_BITS`` bits: for ``a * b``
  ``bits(a) + bits(b) <= MAX_BITS``, for ``a ** b`` ``|b| <= MAX_EXPONENT`` and
  ``bits(a) * b <= MAX_BITS`` (so ``2 ** 10**9`` is refused in microseconds, not computed);
- a float result must be finite, and a real number (``(-8) ** 0.5`` is refused).

Every refusal is a :class:`CalculatorError` (a ValueError) whose message says what to change.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_CHARS = 1000
MAX_BITS = 4096  # about 1233 decimal digits
MAX_EXPONENT = 10_000

Number = int | float


class CalculatorError(ValueError):
    """An expression the calculator refuses, with the reason."""


_BINOPS: dict[type, tuple[str, Callable[[Number, Number], Number]]] = {
    ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv), ast.FloorDiv: ("//", operator.floordiv), ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}
_HINTS: dict[type, str] = {ast.BitXor: "'^' is not a power here; use **", ast.MatMult: "'@' is not arithmetic"}


def evaluate(expression: str) -> Number:
    """The value of an arithmetic ``expression`` (grammar and limits in the module docstring).

    ``evaluate("2 + 3 * (4 - 1)") == 11``; ``evaluate("7 / 2") == 3.5``; ``evaluate("-7 // 2") == -4``.
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression too long: {len(expression)} characters (at most {MAX_CHARS})")
    if not expression.strip():
        raise CalculatorError("empty expression; write arithmetic such as 12 * (3 + 4)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression: {e.msg}") from None
    except (MemoryError, RecursionError):
        raise CalculatorError("expression nested too deeply") from None
    try:
        return _eval(tree.body)
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def format_number(value: Number) -> str:
    """An int as its decimal digits; a float as Python's shortest round-trip ``repr`` (``3.0``, ``0.1``)."""
    return str(value) if isinstance(value, int) else repr(value)


def calculator(expression: str) -> str:
    """The tool: ``format_number(evaluate(expression))``."""
    return format_number(evaluate(expression))


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, got {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op not in _BINOPS:
            raise CalculatorError(_HINTS.get(op, f"operator {type(node.op).__name__} is not allowed; "
                                               "use + - * / // % ** and parentheses"))
        symbol, fn = _BINOPS[op]
        a, b = _eval(node.left), _eval(node.right)
        _precheck(symbol, a, b)
        try:
            return _checked(fn(a, b))
        except ZeroDivisionError:
            raise CalculatorError(f"division by zero in {format_number(a)} {symbol} {format_number(b)}") from None
        except OverflowError:
            raise CalculatorError(f"result of {symbol} is too large for a float") from None
    if isinstance(node, ast.Name):
        raise CalculatorError(f"names are not allowed ({node.id!r}); write numbers only")
    if isinstance(node, ast.Call):
        raise CalculatorError("function calls are not allowed; write + - * / // % ** only")
    raise CalculatorError(f"{type(node).__name__} is not allowed; write numbers, + - * / // % ** and parentheses")


def _precheck(symbol: str, a: Number, b: Number) -> None:
    """Refuse ``*`` and ``**`` whose integer result would exceed MAX_BITS, before computing it."""
    if symbol == "*" and isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_BITS + 1:
        raise CalculatorError(f"result too large (over {MAX_BITS} bits)")
    if symbol == "**":
        if abs(b) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {format_number(b)} too large (at most {MAX_EXPONENT} in size)")
        if isinstance(a, int) and isinstance(b, int) and b > 0 and (abs(a).bit_length() - 1) * b > MAX_BITS:
            raise CalculatorError(f"result too large (over {MAX_BITS} bits)")
        if a == 0 and b < 0:
            raise CalculatorError("division by zero: 0 to a negative power")


def _checked(value: object) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number (a negative base to a fractional power)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"the result is not finite ({value!r})")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError(f"result too large (over {MAX_BITS} bits)")
    assert isinstance(value, (int, float))
    return value
