"""What a tool call returns, and the output limit's rule. Plain data: it crosses processes as JSON."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Reason = Literal["ok", "output_truncated", "error", "bad_args", "unknown_tool", "refused", "timeout", "memory",
                 "cpu", "crash", "busy"]
"""Why a call ended. ``ok`` and ``output_truncated`` are successes (``ok=True``); the rest are
error observations (``ok=False``):

- ``error``: the tool raised (the message is in ``error``); ``bad_args``: the arguments do not fit
  the tool's signature or are not a JSON object; ``unknown_tool``: no tool of that name;
- ``refused``: the tool tried something the sandbox forbids (network, processes, native libraries,
  a module the Python tool does not allow);
- ``timeout``: past ``timeout_s`` of wall-clock time (the worker is killed and replaced);
- ``memory``: past ``memory_mb`` (MemoryError; the worker is replaced); ``cpu``: past ``cpu_s`` of
  CPU time (the kernel killed the worker); ``crash``: the worker died otherwise (a segfault,
  ``os._exit``, a message the pool could not read);
- ``busy``: no worker was free within ``queue_timeout_s``; the tool never ran.
"""
REASONS: tuple[str, ...] = get_args(Reason)
SUCCESS_REASONS = frozenset({"ok", "output_truncated"})


@dataclass(frozen=True)
class ToolResult:
    """One tool call's outcome. ``output`` is at most the pool's ``max_output_chars`` characters."""
    ok: bool
    output: str
    error: str | None
    reason: Reason
    latency_s: float

    def observation(self) -> str:
        """The text to show the model: the output, or ``error: <message>`` for a failed call."""
        return self.output if self.ok else f"error: {self.error}"


class TruncatedText(str):
    """A tool's output that the tool itself already cut (the Python tool's bounded stdout):
    ``total_chars`` is how long it would have been."""

    total_chars: int

    def __new__(cls, text: str, total_chars: int) -> TruncatedText:  # noqa: PYI034 - typing.Self needs 3.11
        obj = super().__new__(cls, text)
        obj.total_chars = total_chars
        return obj


def truncate_output(text: str, limit: int, total_chars: int | None = None) -> tuple[str, bool]:
    """Cut ``text`` to at most ``limit`` characters, marker included.

    Rule: with ``n = total_chars or len(text)``, if ``n <= limit`` the text is returned whole;
    otherwise its first ``limit - len(marker)`` characters (at least 0) followed by
    ``marker = "\\n[output truncated: {n} chars]"``, cut again to ``limit`` if the marker itself is
    longer. Returns ``(text, truncated)``.
    """
    n = len(text) if total_chars is None else max(total_chars, len(text))
    if n <= limit:
        return text, False
    marker = f"\n[output truncated: {n} chars]"
    return (text[:max(0, limit - len(marker))] + marker)[:limit], True
