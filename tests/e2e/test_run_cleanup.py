"""A run killed during its cold start (a test's time limit) leaves no processes and no temp model dir,
and time limits are scaled by the machine's measured slowdown."""
import fcntl
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, _kill_group, net_overrides, session_slowdown

TINY = ["model.embedded.hidden_size=32", "model.embedded.num_layers=1", "model.embedded.num_heads=2",
        "model.embedded.intermediate_size=64"]


def test_killed_run_leaves_no_temp_model_dir_and_no_process(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", f"run.output_dir={tmp_path / 'runs'}", "run.name=k",
           f"model.cache_dir={cache}", "run.dashboard_port=0", "cold_start.steps=1000000", *TINY, *net_overrides()]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300 * session_slowdown()  # a guard against hanging, not a measurement
        while not any(p.is_dir() for p in cache.glob(".embedded-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        temps = [p for p in cache.glob(".embedded-*") if p.is_dir()]
        assert temps, "the cold start never started"
    finally:
        _, err = _kill_group(proc)
    assert not any(p.exists() for p in temps), err
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the run's process group is left
    for lock in cache.glob("*.lock"):  # and the build lock is free again
        with lock.open() as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_time_limits_are_scaled_by_the_measured_slowdown(request, pytestconfig):
    factor = session_slowdown()
    assert 1.0 <= factor <= 10.0
    base = pytestconfig.getini("timeout")
    assert request.node.get_closest_marker("timeout").args[0] == pytest.approx(float(base) * factor)
