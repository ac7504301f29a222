"""The calculator tool: exact values by hand, and a clear refusal for everything else."""
from __future__ import annotations

import pytest

from areal_py.tools.calculator import MAX_BITS, CalculatorError, calculator, evaluate


@pytest.mark.parametrize(("expr", "value"), [
    ("2 + 3 * 4", 14),
    ("(2 + 3) * 4", 20),
    ("-7 // 2", -4),  # floor division rounds down
    ("-7 % 3", 2),  # the sign of the divisor
    ("7 / 2", 3.5),
    ("6 / 2", 3.0),
    ("2 ** 10", 1024),
    ("2 ** -2", 0.25),
    ("-2 ** 2", -4),  # ** binds tighter than unary minus
    ("(-2) ** 3", -8),
    ("--5", 5),
    ("+5 - -5", 10),
    ("1_000 * 3", 3000),
    ("1e3 + 0.5", 1000.5),
    ("123456789 * 987654321", 121932631112635269),
    ("((1))", 1),
])
def test_values(expr: str, value: float) -> None:
    result = evaluate(expr)
    assert result == value and type(result) is type(value)


def test_tool_text() -> None:
    assert calculator("12 * 12") == "144"
    assert calculator("1 / 4") == "0.25"
    assert calculator("6 / 2") == "3.0"
    assert calculator(" 2**64 ") == "18446744073709551616"


@pytest.mark.parametrize(("expr", "message"), [
    ("1 / 0", "division by zero in 1 / 0"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("2 ^ 3", "use **"),
    ("x + 1", "names are not allowed ('x')"),
    ("abs(-1)", "function calls are not allowed"),
    ("__import__('os')", "function calls are not allowed"),
    ("(1).real", "Attribute is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("1 < 2", "Compare is not allowed"),
    ("True + 1", "only numbers are allowed, got True"),
    ("'a' * 3", "only numbers are allowed, got 'a'"),
    ("1j", "only numbers are allowed"),
    ("2 +", "not an arithmetic expression"),
    ("", "empty expression"),
    ("1 + " * 300 + "1", "expression too long"),
    ("2 ** 100000", "exponent 100000 too large"),
    ("3 ** 5000", f"over {MAX_BITS} bits"),
    ("(2 ** 4000) * (2 ** 4000)", f"over {MAX_BITS} bits"),
    ("2 ** 4096", f"over {MAX_BITS} bits"),  # 4097 bits: refused after the (cheap) power
    ("10.0 ** 400", "too large for a float"),
    ("(-8) ** 0.5", "not a real number"),
    ("(2 ** 4000) / 3", "too large for a float"),
    ("~1", "UnaryOp is not allowed"),
])
def test_refusals(expr: str, message: str) -> None:
    with pytest.raises(CalculatorError) as info:
        evaluate(expr)
    assert message in str(info.value)


def test_limits_are_exact() -> None:
    assert evaluate("2 ** 4095").bit_length() == 4096  # the largest power of two allowed
    assert evaluate("-(2 ** 4095)") == -(2 ** 4095)
    with pytest.raises(CalculatorError, match="expression must be a string"):
        evaluate(12)  # type: ignore[arg-type]
