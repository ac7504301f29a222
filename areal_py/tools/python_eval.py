"""A restricted Python evaluator: the ``python`` tool.

:func:`run_python` runs a short snippet and returns what it printed; when the snippet ends in an
expression, that expression's ``repr`` is printed too (as in a notebook: ``"x = 3\\nx * 2"``
gives ``6``). Each call gets a fresh namespace.

What "restricted" means here, and what it does not:

- The snippet sees only :data:`SAFE_BUILTINS` (no ``open``, ``eval``, ``exec``, ``compile``,
  ``getattr``, ``globals``, ``type``, ``input``), and ``import`` of the modules in
  ``allowed_modules`` only (default :data:`DEFAULT_MODULES`: math, fractions, itertools, ...);
  ``import os`` raises :class:`~areal_py.tools.isolation.SandboxRefusal`. An imported module is a
  fresh copy of the module's public attributes, so ``math.pi = 3`` does not outlive the call.
- The source is checked before it runs: no attribute or name that starts with ``_``
  (``().__class__.__base__.__subclasses__()``, the classic way out of restricted builtins, is
  refused), none that reaches a frame (``gi_frame``, ``f_globals``, ... :data:`FRAME_ATTRIBUTES`),
  no relative import.
- stdout is captured into a buffer that keeps at most ``max_output_chars`` characters (a print
  loop cannot fill memory).

This is a filter on well-meant code, not a security boundary: Python has no sound in-process
sandbox, and a determined snippet may find a path the filter misses. The boundary is the
process it runs in (:mod:`areal_py.tools.isolation`): no network, no new processes, memory,
CPU and wall-clock limits, and a worker that is killed and replaced when it misbehaves. It does
not stop a snippet from running long (that is the timeout's job) or from reading files if it
escapes the filter (the file system is not confined).
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import types
from collections.abc import Iterable
from typing import Any

from areal_py.tools.isolation import SandboxRefusal
from areal_py.tools.result import TruncatedText

MAX_CODE_CHARS = 20_000

SAFE_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "callable", "chr", "complex", "dict", "divmod",
    "enumerate", "filter", "float", "format", "frozenset", "hash", "hex", "int", "isinstance", "issubclass",
    "iter", "len", "list", "map", "max", "min", "next", "oct", "ord", "pow", "print", "range", "repr",
    "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip",
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError", "LookupError",
    "OverflowError", "RuntimeError", "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
)


# attributes that reach frames, and through a frame's globals the real builtins
FRAME_ATTRIBUTES = frozenset({"gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "f_back",
                              "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "tb_next"})


class RestrictedCodeError(ValueError):
    """A snippet the checker refuses before running it."""


class _BoundedWriter:
    """A text sink keeping the first ``limit`` characters and counting all of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0

    def write(self, s: str) -> int:
        s = str(s)
        self.total += len(s)
        if self.kept < self.limit:
            piece = s[:self.limit - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)
        return len(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


def check_source(code: str) -> ast.Module:
    """Parse ``code`` and refuse names/attributes starting with ``_`` and relative imports."""
    if len(code) > MAX_CODE_CHARS:
        raise RestrictedCodeError(f"code too long: {len(code)} characters (at most {MAX_CODE_CHARS})")
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError as e:
        raise RestrictedCodeError(f"syntax error on line {e.lineno}: {e.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise RestrictedCodeError(f"attribute {node.attr!r} is not allowed (names starting with '_')")
        if isinstance(node, ast.Attribute) and node.attr in FRAME_ATTRIBUTES:
            raise RestrictedCodeError(f"attribute {node.attr!r} is not allowed (frames and tracebacks)")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise RestrictedCodeError(f"name {node.id!r} is not allowed (names starting with '_')")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise RestrictedCodeError("relative imports are not allowed")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith("_") or "._" in n]
            if bad:
                raise RestrictedCodeError(f"import of {bad[0]!r} is not allowed (names starting with '_')")
    return tree


def _module_copy(name: str) -> types.ModuleType:
    real = importlib.import_module(name)
    copy = types.ModuleType(name)
    for attr, value in vars(real).items():
        if not attr.startswith("_") and not isinstance(value, types.ModuleType):
            setattr(copy, attr, value)
    return copy


def _restricted_builtins(allowed_modules: Iterable[str]) -> dict[str, Any]:
    allowed = frozenset(allowed_modules)
    loaded: dict[str, types.ModuleType] = {}

    def restricted_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                          level: int = 0) -> types.ModuleType:
        if level or name not in allowed:
            raise SandboxRefusal(f"sandbox: import of {name!r} is not allowed; allowed: {', '.join(sorted(allowed))}")
        if name not in loaded:
            loaded[name] = _module_copy(name)
        return loaded[name]

    table = {n: getattr(builtins, n) for n in SAFE_BUILTINS}
    table["__import__"] = restricted_import
    table["__build_class__"] = builtins.__build_class__  # `class` statements
    return table


def run_python(code: str, *, allowed_modules: Iterable[str], max_output_chars: int) -> str:
    """Run ``code`` under the restrictions of the module docstring; return what it printed.

    A final expression statement's value is printed as ``repr`` unless it is None. Exceptions
    from the snippet propagate (the sandbox reports them as the call's error). The returned text
    is at most ``max_output_chars`` characters; when the snippet printed more it is a
    :class:`TruncatedText` carrying the full length.
    """
    if not isinstance(code, str):
        raise RestrictedCodeError(f"code must be a string, got {type(code).__name__}")
    tree = check_source(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    namespace: dict[str, Any] = {"__builtins__": _restricted_builtins(allowed_modules), "__name__": "__snippet__"}
    out = _BoundedWriter(max_output_chars)
    with contextlib.redirect_stdout(out):  # type: ignore[type-var]
        exec(compile(tree, "<snippet>", "exec"), namespace)  # noqa: S102 - the point of this tool
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<snippet>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    text = out.text()
    return TruncatedText(text, out.total) if out.total > len(text) else text

