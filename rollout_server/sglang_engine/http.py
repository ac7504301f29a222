"""Talking to an sglang HTTP server (or launching one): the only part that does I/O with sglang."""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger("rollout.sglang")


# --- the backend: what SGLangEngine needs from sglang ----------------------------------------------
class SGLangBackend(Protocol):
    """The calls the engine makes; `HTTPBackend` talks to sglang, the tests use an in-memory fake."""

    def submit(self, key: str, payload: dict[str, Any]) -> None:
        """Start one `/generate` call (non-blocking); its final answer is later returned by `poll`."""

    def poll(self, timeout: float) -> list[tuple[str, Any]]:
        """(key, response) of attempts that ended; waits up to `timeout` s for the first one.

        A failed call is reported as {"error": message}.
        """

    def abort(self, key: str) -> None:
        """Ask sglang to abort one attempt (best effort)."""

    def pause(self) -> None:
        """Abort everything in flight and hold new work (`/pause_generation` mode abort)."""

    def resume(self) -> None:
        """`/continue_generation`."""

    def update_weights_from_disk(self, model_dir: str, version: int) -> tuple[bool, str]:
        """Load weights from a HF directory; (success, message)."""

    def close(self) -> None: ...


class HTTPBackend:
    """`SGLangBackend` over sglang's HTTP server, stdlib only (urllib + one daemon thread per call)."""

    def __init__(self, base_url: str, *, request_timeout_s: float = 3600.0, control_timeout_s: float = 600.0,
                 process: subprocess.Popen | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self._process = process  # the server we launched (terminated by close), if any
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an env proxy
        self._results: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()

    def request(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        """(HTTP status, JSON body or text). Connection failures raise OSError (URLError)."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout or self.control_timeout_s) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        text = body.decode(errors="replace")
        try:
            return status, json.loads(text) if text else {}
        except json.JSONDecodeError:
            return status, text

    # generation
    def submit(self, key: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._in_flight.add(key)
        threading.Thread(target=self._generate, args=(key, payload), name=f"sglang-{key}", daemon=True).start()

    def _generate(self, key: str, payload: dict[str, Any]) -> None:
        try:
            status, body = self.request("POST", "/generate", payload, timeout=self.request_timeout_s)
            resp = body if status == 200 else {"error": f"HTTP {status}: {body}"}
        except Exception as e:  # noqa: BLE001 - any failure ends this attempt, reported to the engine
            resp = {"error": f"{type(e).__name__}: {e}"}
        with self._lock:
            self._in_flight.discard(key)
        self._results.put((key, resp))

    def poll(self, timeout: float) -> list[tuple[str, Any]]:
        out = []
        try:
            out.append(self._results.get(timeout=timeout) if timeout > 0 else self._results.get_nowait())
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            return out

    # control
    def abort(self, key: str) -> None:
        try:
            status, body = self.request("POST", "/abort_request", {"rid": key})
            if status != 200:
                log.warning("abort of %s: HTTP %s %s", key, status, body)
        except OSError as e:
            log.warning("abort of %s failed: %s", key, e)

    def pause(self) -> None:
        status, body = self.request("POST", "/pause_generation", {"mode": "abort"})
        if status == 404:  # sglang older than the pause API: abort ours one by one
            with self._lock:
                keys = sorted(self._in_flight)
            log.info("sglang has no /pause_generation; aborting %d requests one by one", len(keys))
            for k in keys:
                self.abort(k)
        elif status != 200:
            raise OSError(f"sglang /pause_generation failed: HTTP {status}: {body}")

    def resume(self) -> None:
        status, body = self.request("POST", "/continue_generation", {})
        if status not in (200, 404):
            raise OSError(f"sglang /continue_generation failed: HTTP {status}: {body}")

    def update_weights_from_disk(self, model_dir: str, version: int) -> tuple[bool, str]:
        status, body = self.request("POST", "/update_weights_from_disk",
                                    {"model_path": model_dir, "weight_version": str(version), "flush_cache": True})
        if isinstance(body, dict):
            return status == 200 and bool(body.get("success", True)), str(body.get("message", ""))
        return status == 200, str(body)

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/health", timeout=5.0)[0] == 200
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            keys = sorted(self._in_flight)
        if self._process is None:  # a shared server keeps running: do not leave our requests on it
            for k in keys:
                self.abort(k)
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


# --- launching a server ----------------------------------------------------------------------------
def sglang_launch_command(model_path: str | os.PathLike, *, port: int, host: str = "127.0.0.1", tp_size: int = 1,
                          mem_fraction_static: float = 0.85, max_running: int = 128, seed: int = 0,
                          dtype: str = "auto", context_length: int | None = None, weight_version: int = 0,
                          extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host,
           "--port", str(port), "--skip-tokenizer-init", "--tp-size", str(tp_size),
           "--mem-fraction-static", str(mem_fraction_static), "--max-running-requests", str(max_running),
           "--random-seed", str(seed), "--dtype", dtype, "--weight-version", str(weight_version)]
    if context_length is not None:
        cmd += ["--context-length", str(context_length)]
    return cmd + [str(a) for a in extra_args]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_sglang_server(cmd: Sequence[str], base_url: str, *, timeout_s: float) -> HTTPBackend:
    """Start the server subprocess and wait for `/health`; its output goes to our stdout/stderr (the log)."""
    env = {**os.environ, "SGLANG_RETURN_ORIGINAL_LOGPROB": "false"}  # temperature-scaled logprobs, as ours
    log.info("launching sglang: %s", " ".join(cmd))
    proc = subprocess.Popen(list(cmd), env=env)
    backend = HTTPBackend(base_url, process=proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang server exited with code {proc.returncode} while starting (see the log above)")
        if backend.healthy():
            log.info("sglang server ready at %s", base_url)
            return backend
        time.sleep(1.0)
    backend.close()
    raise TimeoutError(f"sglang server at {base_url} not healthy after {timeout_s:.0f}s")
