"""The tool worker process: imports the tools, confines itself, then runs calls one at a time.

Messages are JSON in both directions (``send_bytes``/``recv_bytes``), never pickle: what the
worker sends is shaped by untrusted tool arguments and output, and the pool reads it as a
hostile peer (size-capped, schema-checked).

    pool -> worker: {"tool": name, "args": {..} | "text"} | null (stop)
    worker -> pool: {"kind": "ready", "network": .., "netns_error": ..}
                  | {"kind": "init_error", "error": traceback}
                  | {"kind": "result", "reason": .., "output": str, "error": str | null, "replace": bool}
"""
from __future__ import annotations

import inspect
import json
import multiprocessing.connection
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from areal_py.tools.isolation import SandboxRefusal, confine, limit_cpu
from areal_py.tools.registry import ToolFn, load_tools, output_text
from areal_py.tools.result import truncate_output

MAX_ERROR_CHARS = 1000


def send(conn: multiprocessing.connection.Connection, msg: dict[str, Any]) -> None:
    """JSON, ASCII-escaped (so a lone surrogate in a tool's output cannot break the encoding)."""
    conn.send_bytes(json.dumps(msg, ensure_ascii=True).encode("ascii"))


def worker_main(conn: multiprocessing.connection.Connection, parent_pid: int, specs: dict[str, str],
                settings: dict[str, Any]) -> None:
    """Entry point of a sandbox worker (``spawn``). ``settings``: memory_mb, cpu_s, max_output_chars,
    python_modules, netns."""
    try:
        tools = load_tools(specs, settings["python_modules"], settings["max_output_chars"])
        for name in settings["python_modules"]:  # imported now, before the limits and the audit hook
            __import__(name)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - a tool's prints are not its output
        confinement = confine(parent_pid, settings["memory_mb"], settings["netns"])
    except BaseException:  # noqa: BLE001 - reported to the pool, which raises it
        send(conn, {"kind": "init_error", "error": traceback.format_exc()[-4000:]})
        return
    send(conn, {"kind": "ready", "network": confinement.network, "netns_error": confinement.netns_error})
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the pool went away
            return
        if request is None:
            return
        limit_cpu(settings["cpu_s"])
        send(conn, run_call(tools, request["tool"], request["args"], settings["max_output_chars"]))


def run_call(tools: Mapping[str, ToolFn], name: str, args: Any, max_output_chars: int) -> dict[str, Any]:
    """Run one call and describe its outcome (the ``result`` message). ``args``: a JSON object
    (keyword arguments) or a string (the tool's one positional argument)."""
    fn = tools.get(name)
    if fn is None:
        return _failed("unknown_tool", f"no tool named {name!r}; tools: {', '.join(sorted(tools))}")
    call_args, call_kwargs = ((args,), {}) if isinstance(args, str) else ((), dict(args))
    try:
        inspect.signature(fn).bind(*call_args, **call_kwargs)
    except TypeError as e:
        return _failed("bad_args", f"tool {name!r}: {e}")
    except ValueError:  # no signature (a builtin): let the call itself say
        pass
    try:
        value = fn(*call_args, **call_kwargs)
        text = output_text(value, name)
    except SandboxRefusal as e:
        return _failed("refused", str(e))
    except MemoryError:
        return _failed("memory", f"tool {name!r} ran out of memory (the limit is tools.memory_mb)", replace=True)
    except BaseException as e:  # noqa: BLE001 - any failure of the tool is its observation
        return _failed("error", f"{type(e).__name__}: {e}")
    output, truncated = truncate_output(text, max_output_chars, getattr(text, "total_chars", None))
    return {"kind": "result", "reason": "output_truncated" if truncated else "ok", "output": output, "error": None,
            "replace": False}


def _failed(reason: str, error: str, replace: bool = False) -> dict[str, Any]:
    return {"kind": "result", "reason": reason, "output": "", "error": truncate_output(error, MAX_ERROR_CHARS)[0],
            "replace": replace}
