"""A pool of confined worker processes that runs tool calls from many threads, never stalling.

``ToolSandbox(cfg).call(name, args) -> ToolResult`` is thread-safe and bounded in time:

- a call waits at most ``queue_timeout_s`` for a free worker (else ``busy``, the tool never ran),
  then at most ``timeout_s`` for the tool (else ``timeout``: the worker is killed and replaced);
- a worker that dies (segfault, ``os._exit``, SIGXCPU past ``cpu_s``), runs out of memory or
  sends something unreadable gives ``crash``/``cpu``/``memory`` and is replaced; the pool keeps
  serving with the other workers meanwhile;
- every call is counted in ``areal_tool_calls_total{tool, outcome}`` and timed in
  ``areal_tool_call_duration_seconds{tool}``, and in :attr:`ToolSandbox.counts`.

Each of the ``workers`` slots is a thread that owns one worker process: it starts it, feeds it
calls from a shared queue, enforces the timeout and replaces it. Workers are started by their
slot's long-lived thread because PR_SET_PDEATHSIG fires when the *thread* that started a process
exits: started from a caller's short-lived thread, a worker would die with it.

Only JSON crosses the pipe from a worker (``send_bytes``, size-capped, schema-checked); the
process start itself (``spawn``) sends the pool's settings the other way. What a worker may and
may not do is in :mod:`areal_py.tools.isolation`.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from areal_py.config.tools import ToolsConfig
from areal_py.telemetry.metrics import TOOL_CALLS, TOOL_DURATION
from areal_py.tools.registry import resolve_tools
from areal_py.tools.result import REASONS, SUCCESS_REASONS, ToolResult, truncate_output
from areal_py.tools.worker import MAX_ERROR_CHARS, worker_main

log = logging.getLogger(__name__)

MAX_ARGS_CHARS = 100_000  # JSON text of one call's arguments
KILL_GRACE_S = 5.0  # past timeout_s, for the slot to kill the worker and report
_LOGGED = frozenset({"timeout", "memory", "cpu", "crash", "busy"})  # the sandbox's failures, not the model's


class ToolWorkerStartError(RuntimeError):
    """A worker could not start (a custom tool that does not import, a broken environment)."""


@dataclass
class _Job:
    name: str
    request: bytes
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "queued"  # queued -> running -> done, or queued -> cancelled (the caller gave up waiting)
    result: tuple[str, str, str | None] | None = None  # (reason, output, error)

    def claim(self) -> bool:
        with self.lock:
            if self.state != "queued":
                return False
            self.state = "running"
            return True

    def cancel(self) -> bool:
        with self.lock:
            if self.state != "queued":
                return False
            self.state = "cancelled"
            return True

    def finish(self, reason: str, output: str = "", error: str | None = None) -> None:
        self.result = (reason, output, error)
        self.state = "done"
        self.done.set()


class _Worker:
    def __init__(self, proc: Any, conn: multiprocessing.connection.Connection) -> None:
        self.proc = proc
        self.conn = conn

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5.0)
        self.conn.close()


class ToolSandbox:
    """Runs tools (built-in and ``cfg.custom``) in ``cfg.workers`` confined processes.

    ``ToolSandbox(cfg=ToolsConfig(), start_timeout_s=60.0)`` starts every worker and waits until
    each is ready; ToolWorkerStartError if one cannot start (e.g. a custom tool that does not
    import). ``call(name, args)``: see :meth:`call`. ``network``: the network isolation the
    workers run under (``"netns+audit"`` or ``"audit"``, see :mod:`areal_py.tools.isolation`).
    ``counts``: calls by reason. ``close()`` stops the workers; also a context manager.
    """

    def __init__(self, cfg: ToolsConfig | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.cfg = cfg = cfg or ToolsConfig()
        self.tools: dict[str, str] = resolve_tools(cfg.custom)
        self.start_timeout_s = start_timeout_s
        self.network = "unknown"
        self.netns_error: str | None = None
        self.counts: Counter[str] = Counter()
        self.restarts = 0
        self._settings = {"memory_mb": cfg.memory_mb, "cpu_s": cfg.cpu_s, "max_output_chars": cfg.max_output_chars,
                          "python_modules": list(cfg.python_modules), "netns": cfg.netns}
        # what a worker's message may be at most: the output and error, JSON-escaped (<= 12 bytes a char)
        self._max_message = 12 * (cfg.max_output_chars + MAX_ERROR_CHARS) + 4096
        self._ctx = multiprocessing.get_context("spawn")
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._workers: dict[int, _Worker] = {}  # slot -> its live worker
        self._start_errors: list[str] = []
        self._started = threading.Semaphore(0)
        self._threads = [threading.Thread(target=self._slot, args=(i,), name=f"tool-slot-{i}", daemon=True)
                         for i in range(cfg.workers)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + start_timeout_s + 1.0
        for _ in self._threads:
            if not self._started.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self._start_errors.append(f"a tool worker was not ready within {start_timeout_s:g} s")
                break
        if self._start_errors:
            self.close()
            raise ToolWorkerStartError("the tool sandbox could not start its workers:\n" + self._start_errors[0])

    # -- public API -----------------------------------------------------------------------------

    def call(self, name: str, args: Mapping[str, Any] | str | None = None) -> ToolResult:
        """Run tool ``name`` with ``args`` (a JSON object of keyword arguments, or a string passed
        as the tool's one positional argument, e.g. the text between a tool tag's open and close).

        Never raises for anything the tool or the arguments do: a failure is a ToolResult with
        ``ok=False`` and its reason. Blocks at most ``queue_timeout_s + timeout_s`` (plus a few
        seconds to kill a stuck worker). RuntimeError after :meth:`close`.
        """
        start = time.monotonic()
        if self._closed.is_set():
            raise RuntimeError("the tool sandbox is closed")
        label = name if isinstance(name, str) and name in self.tools else "unknown"
        if label == "unknown":
            return self._record(label, start, "unknown_tool",
                                error=f"no tool named {name!r}; tools: {', '.join(sorted(self.tools))}")
        try:
            request = self._request(name, args)
        except ValueError as e:
            return self._record(label, start, "bad_args", error=str(e))
        job = _Job(name, request)
        self._jobs.put(job)
        cfg = self.cfg
        if not job.done.wait(cfg.queue_timeout_s) and job.cancel():
            return self._record(label, start, "busy", error=(
                f"no tool worker was free within tools.queue_timeout_s={cfg.queue_timeout_s:g} s (all "
                f"{cfg.workers} tools.workers busy); {name!r} did not run"))
        if not job.done.wait(cfg.timeout_s + KILL_GRACE_S + 1.0):  # the slot enforces timeout_s; a safety net
            return self._record(label, start, "timeout", error=f"tool {name!r} gave no answer within "
                                f"tools.timeout_s={cfg.timeout_s:g} s")
        assert job.result is not None
        reason, output, error = job.result
        return self._record(label, start, reason, output, error)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (one per slot that has one)."""
        with self._lock:
            return [w.proc.pid for w in self._workers.values()]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers. Calls waiting in the queue return ``busy``; later calls raise."""
        if self._closed.is_set():
            return
        self._closed.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    def __enter__(self) -> ToolSandbox:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _request(self, name: str, args: Mapping[str, Any] | str | None) -> bytes:
        if args is None:
            args = {}
        if not isinstance(args, (str, Mapping)):
            raise ValueError(f"tool {name!r}: arguments must be a JSON object or a string, got {type(args).__name__}")
        if isinstance(args, Mapping) and not all(isinstance(k, str) for k in args):
            raise ValueError(f"tool {name!r}: argument names must be strings")
        try:
            text = json.dumps({"tool": name, "args": args if isinstance(args, str) else dict(args)},
                              ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tool {name!r}: arguments are not plain JSON ({e})") from None
        if len(text) > MAX_ARGS_CHARS:
            raise ValueError(f"tool {name!r}: arguments too long ({len(text)} chars of JSON, at most {MAX_ARGS_CHARS})")
        return text.encode("ascii")

    def _record(self, label: str, start: float, reason: str, output: str = "", error: str | None = None) -> ToolResult:
        latency = time.monotonic() - start
        with self._lock:
            self.counts[reason] += 1
        TOOL_CALLS.labels(tool=label, outcome=reason).inc()
        TOOL_DURATION.labels(tool=label).observe(latency)
        ok = reason in SUCCESS_REASONS
        if reason in _LOGGED:
            log.warning("tool call %s: %s (%.2f s)", reason, error, latency)
        return ToolResult(ok=ok, output=output if ok else "", error=None if ok else (error or reason),
                          reason=reason, latency_s=latency)  # type: ignore[arg-type]

    def _slot(self, index: int) -> None:
        """One slot's thread: own a worker, run calls on it, replace it when it fails."""
        worker: _Worker | None = None
        first = True
        try:
            while not self._closed.is_set():
                if worker is None:
                    try:
                        worker = self._start_worker()
                    except Exception as e:  # noqa: BLE001 - ToolWorkerStartError, or the process start itself
                        if first:
                            self._start_errors.append(str(e))
                            self._started.release()
                            return
                        log.warning("tool slot %d: a replacement worker did not start (retrying in 1 s): %s", index, e)
                        self._closed.wait(1.0)
                        continue
                    with self._lock:
                        self._workers[index] = worker
                    if first:
                        first = False
                        self._started.release()
                try:
                    job = self._jobs.get(timeout=0.5)
                except queue.Empty:
                    continue
                if self._closed.is_set():
                    if job.claim():
                        job.finish("busy", error="the tool sandbox was closed before the call ran")
                    continue
                if not job.claim():
                    continue
                try:
                    healthy = self._run(worker, job)
                except Exception:  # a bug here must not leave the caller waiting or the slot dead
                    log.exception("tool slot %d: unexpected error running %r", index, job.name)
                    if job.state != "done":
                        job.finish("crash", error=f"tool {job.name!r}: internal error of the sandbox (logged)")
                    healthy = False
                if not healthy:
                    with self._lock:
                        self._workers.pop(index, None)
                        self.restarts += 1
                    worker.stop()
                    worker = None
        finally:
            if worker is not None:
                with self._lock:
                    self._workers.pop(index, None)
                worker.stop()
            self._drain()

    def _drain(self) -> None:
        """After close: every call still queued returns busy."""
        if not self._closed.is_set():
            return
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job.claim():
                job.finish("busy", error="the tool sandbox was closed before the call ran")

    def _run(self, w: _Worker, job: _Job) -> bool:
        """Run ``job`` on ``w`` and finish it; False when the worker must be replaced."""
        try:
            w.conn.send_bytes(job.request)
        except OSError:
            job.finish(*self._death(w, job.name))
            return False
        deadline = time.monotonic() + self.cfg.timeout_s
        if not w.conn.poll(self.cfg.timeout_s):
            w.proc.kill()
            job.finish("timeout", error=f"tool {job.name!r} ran past tools.timeout_s={self.cfg.timeout_s:g} s "
                       "and was stopped")
            return False
        # a worker that sent part of a message and stopped would hold recv_bytes forever: kill it then
        stuck = threading.Timer(max(0.0, deadline - time.monotonic()) + 0.5, w.proc.kill)
        stuck.daemon = True
        stuck.start()
        try:
            data = w.conn.recv_bytes(self._max_message)
        except (EOFError, OSError):  # the worker died, or sent more than any result can be
            w.proc.join(2.0)
            if stuck.finished.is_set():
                job.finish("timeout", error=f"tool {job.name!r} sent part of its result and stopped; stopped at "
                           f"tools.timeout_s={self.cfg.timeout_s:g} s")
            elif w.proc.exitcode is None:
                job.finish("crash", error=f"tool {job.name!r}: its worker sent a message over "
                           f"{self._max_message} bytes")
            else:
                job.finish(*self._death(w, job.name))
            return False
        finally:
            stuck.cancel()
        try:
            checked = _check_result(json.loads(data), self.cfg.max_output_chars)
        except ValueError:  # not JSON
            checked = None
        if checked is None:
            job.finish("crash", error=f"tool {job.name!r}: its worker sent a malformed result")
            return False
        reason, output, error, replace = checked
        job.finish(reason, output, error)
        return not replace

    def _death(self, w: _Worker, name: str) -> tuple[str, str, str]:
        """(reason, output, error) for a call whose worker died: ``cpu`` for SIGXCPU, else ``crash``."""
        w.proc.join(2.0)
        code = w.proc.exitcode
        reason = "cpu" if code == -signal.SIGXCPU else "crash"
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            if reason == "cpu":
                how += f", past tools.cpu_s={self.cfg.cpu_s} s of CPU"
            elif code == -signal.SIGKILL:
                how += ": out of memory, or killed from outside"
        else:
            how = f"exited with code {code}"
        return reason, "", f"tool {name!r} ended its worker ({how})"

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, name="tool-worker", daemon=True,
                                 args=(child_conn, os.getpid(), self.tools, self._settings))
        proc.start()
        child_conn.close()
        w = _Worker(proc, parent_conn)
        try:
            if not parent_conn.poll(self.start_timeout_s):
                raise ToolWorkerStartError(f"a tool worker was not ready within {self.start_timeout_s:g} s")
            msg = json.loads(parent_conn.recv_bytes(1 << 20))
        except (EOFError, OSError, ValueError) as e:
            w.stop()
            raise ToolWorkerStartError(f"a tool worker died while starting (exit code {proc.exitcode}): {e}") from None
        except ToolWorkerStartError:
            w.stop()
            raise
        if not isinstance(msg, dict) or msg.get("kind") != "ready":
            w.stop()
            error = msg.get("error") if isinstance(msg, dict) else None
            raise ToolWorkerStartError(f"a tool worker failed to start:\n{error if isinstance(error, str) else repr(msg)}")
        with self._lock:
            if self.network != msg.get("network"):
                self.network = str(msg.get("network"))
                self.netns_error = msg.get("netns_error")
                log.info("tool workers: network isolation %s%s", self.network,
                         f" ({self.netns_error})" if self.netns_error else "")
        return w


def _check_result(msg: Any, max_output_chars: int) -> tuple[str, str, str | None, bool] | None:
    """A worker's result message as (reason, output, error, replace), or None if it is malformed."""
    if not isinstance(msg, dict) or msg.get("kind") != "result":
        return None
    reason, output, error, replace = msg.get("reason"), msg.get("output"), msg.get("error"), msg.get("replace")
    if reason not in REASONS or not isinstance(output, str) or not (error is None or isinstance(error, str)):
        return None
    if not isinstance(replace, bool):
        return None
    output, cut = truncate_output(output, max_output_chars)
    if cut and reason == "ok":
        reason = "output_truncated"
    return reason, output, None if error is None else truncate_output(error, MAX_ERROR_CHARS)[0], replace
