"""Tools by name: the built-in ones and the user's own ``"package.module:function"``.

A tool is a top-level function called with keyword arguments from a JSON object
(``fn(**args)``) that returns a ``str`` (or a JSON value: number, bool, null, list, dict, which
is sent as its JSON text). Built in:

- ``calculator(expression: str)``: :func:`areal_py.tools.calculator.calculator`;
- ``python(code: str)``: :func:`areal_py.tools.python_eval.run_python`, with the pool's allowed
  modules and output limit.

User tools are named in config (``tools.custom: {name: "package.module:function"}``) and, like
custom reward functions, must be importable in a fresh Python process: they are imported in
every sandbox worker, never in the pool's own process. They run with the worker's limits, not
with the Python tool's filter: a user tool is trusted code fed untrusted arguments.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from areal_py.import_spec import load_callable, split_spec
from areal_py.tools.python_eval import run_python

BUILTIN_TOOLS: dict[str, str] = {
    "calculator": "areal_py.tools.calculator:calculator",
    "python": "areal_py.tools.python_eval:run_python",
}
TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")

ToolFn = Callable[..., Any]


def resolve_tools(custom: Mapping[str, str] | None = None) -> dict[str, str]:
    """The built-in tools plus ``custom`` (``{name: "package.module:function"}``), checked for form
    only (names match :data:`TOOL_NAME`, do not shadow a built-in, specs look like ``module:function``);
    whether they import is checked when a worker starts."""
    tools = dict(BUILTIN_TOOLS)
    for name, spec in (custom or {}).items():
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter, "
                             "at most 64)")
        if name in BUILTIN_TOOLS:
            raise ValueError(f"tool name {name!r} is a built-in tool; pick another name for "
                             f"tools.custom.{name}")
        split_spec(spec, f"tools.custom.{name}={spec!r}")
        tools[name] = spec
    return tools


def import_tool(path: str) -> ToolFn:
    """Import ``"package.module:function"``; ValueError naming the path when it is not a callable."""
    return load_callable(path, f"tool {path!r}")


def load_tools(specs: Mapping[str, str], python_modules: Sequence[str], max_output_chars: int) -> dict[str, ToolFn]:
    """Import every tool of ``specs`` (in a worker); the Python tool gets the pool's settings."""
    tools: dict[str, ToolFn] = {}
    for name, spec in specs.items():
        if name == "python" and spec == BUILTIN_TOOLS["python"]:
            tools[name] = functools.partial(run_python, allowed_modules=tuple(python_modules),
                                            max_output_chars=max_output_chars)
        else:
            tools[name] = import_tool(spec)
    return tools


def output_text(value: Any, name: str) -> str:
    """A tool's return value as text: a ``str`` as it is, a JSON value as its JSON; TypeError otherwise."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        raise TypeError(f"tool {name!r} returned {type(value).__name__}; return a str or a JSON value") from None
