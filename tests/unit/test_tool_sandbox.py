"""The tool sandbox: misbehaving tools end as counted error observations and the pool keeps serving."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import REGISTRY

from areal_py.config.tools import ToolsConfig
from areal_py.tools.registry import resolve_tools
from areal_py.tools.sandbox import ToolSandbox, ToolWorkerStartError

FIXTURES = {name: f"tests.tool_fixtures:{name}" for name in (
    "echo", "add", "hang", "spin", "segfault", "hard_exit", "fails", "memory_bomb", "connect", "resolve",
    "run_process", "shell", "huge_output", "interfaces", "partial_message")}


def calls(tool: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("areal_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0


def wait_for(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met within 30 s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def sandbox():
    cfg = ToolsConfig(workers=2, timeout_s=1.0, memory_mb=256, max_output_chars=200, custom=FIXTURES)
    with ToolSandbox(cfg) as sb:
        yield sb


def test_builtin_tools(sandbox: ToolSandbox) -> None:
    r = sandbox.call("calculator", {"expression": "12 * (3 + 4) - 2 ** 5"})
    assert (r.ok, r.reason, r.output, r.error) == (True, "ok", "52", None)
    assert sandbox.call("calculator", "7 // 2").output == "3"  # a string is the tool's one argument
    r = sandbox.call("calculator", "1 / 0")
    assert (r.ok, r.reason) == (False, "error") and "division by zero" in r.error
    assert r.observation() == "error: " + r.error
    r = sandbox.call("python", {"code": "import math\nprint(math.comb(10, 3))\nsum(range(5))"})
    assert (r.ok, r.output) == (True, "120\n10\n")


def test_hung_tool_times_out_is_counted_and_the_next_call_works(sandbox: ToolSandbox) -> None:
    before, restarts = calls("hang", "timeout"), sandbox.restarts
    pids = set(sandbox.worker_pids())
    r = sandbox.call("hang")
    assert (r.ok, r.reason) == (False, "timeout") and "tools.timeout_s=1" in r.error
    assert r.latency_s >= 1.0
    assert calls("hang", "timeout") == before + 1 and sandbox.restarts == restarts + 1
    assert sandbox.call("add", {"a": 2, "b": 3}).output == "5"  # served at once by the other worker
    wait_for(lambda: len(sandbox.worker_pids()) == 2)  # the replacement started
    assert len(set(sandbox.worker_pids()) - pids) == 1  # one worker replaced, the other kept


def test_a_half_sent_result_does_not_hold_the_pool(sandbox: ToolSandbox) -> None:
    r = sandbox.call("partial_message")
    assert (r.ok, r.reason) == (False, "timeout") and "sent part of its result" in r.error
    assert sandbox.call("echo", "next").output == "next"


def test_crashing_tools_are_counted_and_replaced(sandbox: ToolSandbox) -> None:
    before = calls("segfault", "crash"), calls("hard_exit", "crash"), calls("fails", "error")
    r = sandbox.call("segfault")
    assert (r.ok, r.reason) == (False, "crash") and "SIGSEGV" in r.error
    r = sandbox.call("hard_exit")
    assert (r.ok, r.reason) == (False, "crash") and "exited with code 3" in r.error
    r = sandbox.call("fails")
    assert (r.ok, r.reason, r.error) == (False, "error", "RuntimeError: tool bug on purpose")
    assert (calls("segfault", "crash"), calls("hard_exit", "crash"), calls("fails", "error")) == tuple(
        b + 1 for b in before)
    assert sandbox.call("echo", "still here").output == "still here"


def test_memory_bomb(sandbox: ToolSandbox) -> None:
    r = sandbox.call("memory_bomb")
    assert not r.ok and r.reason in ("memory", "crash"), r
    r = sandbox.call("python", "x = 'a' * 10**10")
    assert (r.ok, r.reason) == (False, "memory"), r
    assert sandbox.call("add", {"a": 1, "b": 1}).output == "2"


@pytest.mark.parametrize("tool", ["connect", "resolve", "run_process", "shell"])
def test_network_and_processes_are_refused(sandbox: ToolSandbox, tool: str) -> None:
    before = calls(tool, "refused")
    r = sandbox.call(tool)
    assert (r.ok, r.reason) == (False, "refused"), r
    assert r.error.startswith("sandbox: ") and "not allowed" in r.error
    assert calls(tool, "refused") == before + 1


def test_python_snippet_cannot_import_socket(sandbox: ToolSandbox) -> None:
    r = sandbox.call("python", "import socket")
    assert (r.ok, r.reason) == (False, "refused") and "'socket'" in r.error
    r = sandbox.call("python", "().__class__.__base__.__subclasses__()")
    assert (r.ok, r.reason) == (False, "error") and "'__subclasses__'" in r.error


def test_network_namespace_has_only_loopback(sandbox: ToolSandbox) -> None:
    assert sandbox.network in ("netns+audit", "audit")
    if sandbox.network != "netns+audit":
        pytest.skip(f"the kernel refused an unprivileged network namespace: {sandbox.netns_error}")
    assert sandbox.call("interfaces").output == '["lo"]'


def test_output_is_truncated_with_a_marker(sandbox: ToolSandbox) -> None:
    r = sandbox.call("huge_output", {"n": 100_000})
    marker = "\n[output truncated: 100000 chars]"
    assert (r.ok, r.reason) == (True, "output_truncated")
    assert len(r.output) == 200 and r.output == "x" * (200 - len(marker)) + marker
    r = sandbox.call("python", "for i in range(10**5): print(i)")
    assert r.reason == "output_truncated" and len(r.output) == 200 and r.output.startswith("0\n1\n2\n")
    assert sandbox.call("huge_output", {"n": 200}).reason == "ok"


def test_bad_calls_are_error_observations(sandbox: ToolSandbox) -> None:
    before = calls("unknown", "unknown_tool")
    r = sandbox.call("rm -rf /", {})
    assert (r.ok, r.reason) == (False, "unknown_tool") and "calculator" in r.error
    assert calls("unknown", "unknown_tool") == before + 1  # no label per made-up name
    assert sandbox.call("add", {"a": 1}).reason == "bad_args"
    assert sandbox.call("add", {"a": {1, 2}, "b": 1}).reason == "bad_args"  # not JSON
    assert sandbox.call("add", [1, 2]).reason == "bad_args"  # type: ignore[arg-type]
    assert sandbox.call("add", {"a": float("nan"), "b": 1}).reason == "bad_args"


def test_concurrent_calls_from_threads(sandbox: ToolSandbox) -> None:
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def episode(i: int) -> None:
        try:
            for j in range(3):
                results[i, j] = sandbox.call("add", {"a": i, "b": 100 * j}).output
        except BaseException as e:  # noqa: BLE001 - read by the test
            errors.append(e)

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(8)]
    hung = threading.Thread(target=sandbox.call, args=("hang",))  # one slot stuck a while meanwhile
    hung.start()
    for t in threads:
        t.start()
    for t in threads + [hung]:
        t.join(60)
    assert not errors
    assert results == {(i, j): str(i + 100 * j) for i in range(8) for j in range(3)}


def test_queue_wait_is_bounded_and_named() -> None:
    cfg = ToolsConfig(workers=1, timeout_s=2.0, queue_timeout_s=0.2, custom=FIXTURES)
    with ToolSandbox(cfg) as sb:
        hung = threading.Thread(target=sb.call, args=("hang",))
        hung.start()
        while sb._jobs.unfinished_tasks == 0 or not sb._jobs.empty():  # until the slot took the hang
            time.sleep(0.01)
        r = sb.call("echo", "hi")
        hung.join(30)
        assert (r.ok, r.reason) == (False, "busy"), r
        assert "tools.queue_timeout_s=0.2" in r.error and "did not run" in r.error
        wait_for(lambda: len(sb.worker_pids()) == 1)  # the hung worker's replacement started
        assert sb.call("echo", "hi").output == "hi"
        pids = sb.worker_pids()
    with pytest.raises(RuntimeError, match="closed"):
        sb.call("echo", "hi")
    assert pids and not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_cpu_limit_kills_a_spinning_tool() -> None:
    cfg = ToolsConfig(workers=1, timeout_s=60.0, cpu_s=1, custom=FIXTURES)
    with ToolSandbox(cfg) as sb:
        r = sb.call("spin")
        assert (r.ok, r.reason) == (False, "cpu") and "SIGXCPU" in r.error
        assert sb.call("echo", "after").output == "after"


def test_a_tool_that_does_not_import_stops_the_start() -> None:
    with pytest.raises(ToolWorkerStartError, match="tests.tool_fixtures:missing"):
        ToolSandbox(ToolsConfig(workers=1, custom={"missing": "tests.tool_fixtures:missing"}))


def test_resolve_tools_checks_names_and_paths() -> None:
    assert resolve_tools({"mine": "pkg.mod:fn"})["mine"] == "pkg.mod:fn"
    assert set(resolve_tools()) == {"calculator", "python"}
    with pytest.raises(ValueError, match="built-in"):
        resolve_tools({"python": "pkg.mod:fn"})
    with pytest.raises(ValueError, match="package.module:function"):
        resolve_tools({"mine": "pkg.mod"})
    with pytest.raises(ValueError, match="tool name"):
        resolve_tools({"bad name": "pkg.mod:fn"})


def test_workers_die_with_the_pool_process(tmp_path) -> None:
    """Both workers busy in a hung tool (so not waiting to read EOF) when the pool's process is SIGKILLed."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import threading, time\n"
        "from areal_py.config.tools import ToolsConfig\n"
        "from areal_py.tools.sandbox import ToolSandbox\n"
        "if __name__ == '__main__':\n"
        "    sb = ToolSandbox(ToolsConfig(workers=2, timeout_s=100, custom={'hang': 'tests.tool_fixtures:hang'}))\n"
        "    for _ in range(2):\n"
        "        threading.Thread(target=sb.call, args=('hang',), daemon=True).start()\n"
        "    while sb._jobs.unfinished_tasks < 2 or not sb._jobs.empty():\n"
        "        time.sleep(0.01)\n"
        "    print(*sb.worker_pids(), flush=True)\n"
        "    time.sleep(120)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()  # SIGKILL: no atexit, no close(); only the kernel's PDEATHSIG can stop the workers
        proc.wait()
    wait_for(lambda: not any(_alive(p) for p in pids))
