"""Shared fixtures: free loopback ports, a session-wide model cache, and a helper to run areal-py."""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def net_overrides() -> list[str]:
    a, b, c, d = free_ports(4)
    return [f"net.rollout_port={a}", f"net.weights_port={b}", f"net.trainer_port={c}", f"net.batch_port={d}"]


def measure_slowdown() -> float:
    """How much slower than an idle core this machine runs a process now: the wall time of a fixed
    single-threaded torch workload over its CPU time, clamped to [1, 10].

    On an idle core wall == CPU time; when other processes compete, this one gets a share of a core
    and wall grows while CPU time does not. The ratio needs no reference machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(192, 192)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(300):
            x = torch.tanh(x @ x.T / 192)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        torch.set_num_threads(old)
    return min(10.0, max(1.0, wall / max(cpu, 1e-6)))


@functools.lru_cache(maxsize=1)
def session_slowdown() -> float:
    """`measure_slowdown` once per session: scales every test's pytest-timeout (see below)."""
    return measure_slowdown()


def scaled(seconds: float) -> float:
    """A time limit meant for an idle machine, scaled by the slowdown now (or at session start,
    whichever is larger): for the waits tests make themselves, as `run_cli` does for its runs."""
    return seconds * max(session_slowdown(), measure_slowdown())


def wait_for(pred, timeout: float, what: str) -> None:
    """Poll `pred` until it holds; `timeout` is for an idle machine (scaled by the slowdown), and the
    error names `what` was awaited."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pytest_report_header(config) -> str:
    return f"slowdown factor (wall/CPU time of a fixed workload; scales time limits): {session_slowdown():.2f}"


def pytest_collection_modifyitems(config, items) -> None:
    """Every test's time limit (its timeout marker, else pyproject's) times the slowdown: a busy
    machine makes the suite slower, not red."""
    factor = session_slowdown()
    for item in items:
        marker = item.get_closest_marker("timeout")
        base = marker.args[0] if marker is not None and marker.args else getattr(config, "_env_timeout", None)
        if base:
            item.add_marker(pytest.mark.timeout(float(base) * factor), append=False)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The session's model cache, with the model of the tests' default run already built.

    Built here in-process with no time limit of its own, so no timed end-to-end run has to do
    it, and one build serves every test (prepare_embedded_model locks per model, so a test that
    needs another setting builds it once too)."""
    from areal_py.app.model_dir import prepare_model
    from areal_py.config import load_config

    cache = tmp_path_factory.mktemp("model-cache")
    prepare_model(load_config(None, [f"model.cache_dir={cache}", *SMALL_RUN]))
    return cache


# Small enough for seconds per step on 2 cores, large enough to exercise batching and staleness.
SMALL_RUN = ["run.dashboard_port=0", "controller.batch_size=8", "controller.group_size=4", "trainer.checkpoint_every=0",
             "controller.startup_timeout_s=120", "trainer.batch_timeout_s=120"]


@pytest.fixture
def small_cfg(tmp_path, model_cache) -> list[str]:
    """Overrides for a short, isolated run under tmp_path."""
    return [f"run.output_dir={tmp_path / 'runs'}", "run.name=t", f"model.cache_dir={model_cache}",
            *SMALL_RUN, *net_overrides()]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`areal-py ARGS` to completion. `timeout` is for an idle machine and is scaled by the slowdown
    measured now (or at session start, whichever is larger).

    The run gets its own process group; if it overruns, or the test is interrupted, the whole group
    gets SIGTERM (the launcher cleans up: temp model dir, its roles), then SIGKILL after 10 s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    limit = scaled(timeout)
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        out, err = _kill_group(proc)
        raise subprocess.TimeoutExpired(proc.args, limit, out, err) from None
    except BaseException:  # the test itself timed out or was interrupted
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def serve_role(role: str, cfg_file: Path, log, *extra: str) -> subprocess.Popen:
    """`areal-py serve ROLE CFG_FILE EXTRA...` in the background, its output to the open file `log`."""
    return subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "serve", role, str(cfg_file), *extra],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM the process group of `proc` (its own session), 10 s to exit cleanly, then SIGKILL
    whatever is left of the group; returns the output read meanwhile."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        out = err = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything that outlived the grace
    except ProcessLookupError:
        pass
    if out is None:
        out, err = proc.communicate()
    return out or "", err or ""


def window_means(rewards: list[float], width: int) -> list[float]:
    """Means of consecutive, non-overlapping windows of `width` steps."""
    return [sum(rewards[i:i + width]) / width for i in range(0, len(rewards) - width + 1, width)]


@pytest.fixture(scope="module")
def kernel():
    """The decode attention kernel (built once per machine, in the session's first use); skips where it cannot
    be built, naming why."""
    from rollout_server.torch_engine.attention_kernel import load_kernel

    built = load_kernel()
    if built.fn is None:
        pytest.skip(f"no decode attention kernel on this machine: {built.reason}")
    return built.fn


def controller_rejected(port: int, reason: str, token: str | None = None) -> float:
    """areal_rejected_messages_total{role="controller", reason} from the controller's /metrics (0 before it serves);
    `token`: the run's http_token, which /metrics asks for when the controller binds off loopback."""
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        text = urllib.request.urlopen(req, timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("areal_rejected_messages_total{") and f'reason="{reason}"' in line
               and 'role="controller"' in line)


def on_thread(target, errors: list) -> threading.Thread:
    """Run `target` on a daemon thread, started; whatever it raises is appended to `errors` for the test."""
    def run() -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
