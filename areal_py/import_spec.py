"""``"package.module:name"`` settings (custom tools, reward functions, agents, workflows) -> the object named.

The rule: ``load_object("pkg.mod:attr", ...)`` is ``getattr(importlib.import_module("pkg.mod"), "attr")``; the
module part and the name part must both be non-empty. Every error is a ValueError that starts with the caller's
`what` (the setting and its value, e.g. ``rollout.agent='my_agents:solve'``), so it says which key to change.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

FUNCTION_FORM = "'package.module:function'"


def split_spec(spec: object, what: str, expected: str = FUNCTION_FORM) -> tuple[str, str]:
    """(module, name) of ``"module:name"``; ``ValueError("<what>: expected <expected>")`` for any other value."""
    module, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module or not attr:
        raise ValueError(f"{what}: expected {expected}")
    return module, attr


def load_object(spec: str, what: str, expected: str = FUNCTION_FORM) -> object:
    """The object `spec` names, imported now; ValueError naming `what` when the form is wrong or the module or
    name cannot be imported (an error raised while the module runs propagates as it is)."""
    module, attr = split_spec(spec, what, expected)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} cannot be imported: {e} (is its package on PYTHONPATH?)") from e


def load_callable(spec: str, what: str, expected: str = FUNCTION_FORM) -> Callable[..., Any]:
    """``load_object`` of a spec that must name a callable (``<what> is not callable``)."""
    fn = load_object(spec, what, expected)
    if not callable(fn):
        raise ValueError(f"{what} is not callable")
    return fn
