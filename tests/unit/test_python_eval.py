"""The restricted Python evaluator, in process (the sandbox tests run it in a worker)."""
from __future__ import annotations

import math

import pytest

from areal_py.tools.isolation import SandboxRefusal
from areal_py.tools.python_eval import RestrictedCodeError, run_python
from areal_py.tools.result import TruncatedText, truncate_output

MODULES = ("math", "fractions")


def run(code: str, limit: int = 1000) -> str:
    return run_python(code, allowed_modules=MODULES, max_output_chars=limit)


def test_prints_and_the_last_expression() -> None:
    assert run("print(1 + 1)") == "2\n"
    assert run("x = 3\nx * 2") == "6\n"
    assert run("from fractions import Fraction\nFraction(1, 3) + Fraction(1, 6)") == "Fraction(1, 2)\n"
    assert run("import math\nmath.isqrt(10**6)") == "1000\n"
    assert run("x = None\nx") == ""
    assert run("class P:\n    def __init__(self, x):\n        self.x = x\nP(4).x + 1") == "5\n"  # a None value prints nothing, as in a notebook
    assert run("def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\nprint([f(i) for i in range(8)])") \
        == "[0, 1, 1, 2, 3, 5, 8, 13]\n"


def test_each_call_has_its_own_namespace_and_module_copies() -> None:
    run("import math\nmath.pi = 3\ny = 1")
    assert math.pi != 3  # the real module is untouched
    assert run("import math\nmath.pi") == repr(math.pi) + "\n"
    with pytest.raises(NameError):
        run("y")


@pytest.mark.parametrize("module", ["os", "sys", "subprocess", "socket", "importlib", "builtins"])
def test_imports_outside_the_list_are_refused(module: str) -> None:
    with pytest.raises(SandboxRefusal, match=f"import of '{module}' is not allowed"):
        run(f"import {module}")


@pytest.mark.parametrize(("code", "message"), [
    ("().__class__.__base__.__subclasses__()", "'__subclasses__'"),
    ("__builtins__", "'__builtins__'"),
    ("def g():\n    yield 1\ng().gi_frame.f_back", "'f_back'"),
    ("from . import x", "relative imports"),
    ("import math._x", "not allowed"),
    ("def (", "syntax error on line 1"),
])
def test_escapes_are_refused_before_running(code: str, message: str) -> None:
    with pytest.raises(RestrictedCodeError) as info:
        run(code)
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["open", "eval", "exec", "compile", "getattr", "globals", "type", "input"])
def test_dangerous_builtins_are_absent(name: str) -> None:
    with pytest.raises(NameError):
        run(f"{name}")


def test_errors_propagate() -> None:
    with pytest.raises(ZeroDivisionError):
        run("1 / 0")


def test_stdout_is_bounded_and_counted() -> None:
    out = run("for i in range(1000): print('abcdefghi')", limit=25)  # 10 chars a line, 10000 in all
    assert isinstance(out, TruncatedText) and out == "abcdefghi\n" * 2 + "abcde" and out.total_chars == 10_000
    text, cut = truncate_output(out, 60, out.total_chars)
    assert cut and text == out + "\n[output truncated: 10000 chars]"  # 25 + 32 characters


def test_truncate_output_rule() -> None:
    assert truncate_output("abc", 3) == ("abc", False)
    marker = "\n[output truncated: 50 chars]"  # 29 characters
    assert truncate_output("y" * 50, 40) == ("y" * 11 + marker, True)
    assert truncate_output("y" * 50, 10) == (marker[:10], True)  # the marker alone, cut
    assert truncate_output("short", 40, total_chars=50) == ("short"[:11] + marker, True)
