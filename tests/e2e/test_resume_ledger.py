"""kill -9 of a role (or of the launcher) mid-run, then `areal-py run --resume`: the ledger holds (every prompt
the run took is trained exactly once or dropped with a reason) and the staleness bound holds for resumed tokens.

The trainer's case runs in the default suite (tests/e2e/test_e2e.py, test_resume_after_kill_past_the_last_
checkpoint); the controller's, the launcher's and a rollout server's are whole runs each, so `slow`. So is the
randomized one: for each seed, a role drawn at random killed at a random moment, with the same checks."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, scaled, wait_for

from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl

pytestmark = pytest.mark.slow
STEPS = 12


def in_flight_after(run_dir: Path, step: int) -> bool:
    """The last step record is past `step` and its batch left groups running or ready (8 groups a batch)."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    return bool(recs) and recs[-1]["step"] > step and (recs[-1]["ctrl_running"] > 0
                                                        or recs[-1]["ctrl_accepted"] > recs[-1]["step"] * 8)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def role_pid(launcher: int, name: str) -> int:
    found = [p for p in children(launcher) if f"{name}" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
    assert len(found) == 1, (name, found)
    return found[0]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("victim,servers", [("controller", 1), ("launcher", 1), ("rollout-1", 2)])
def test_kill_9_of_a_role_then_resume_keeps_the_ledger(tmp_path, small_cfg, victim, servers):
    run_dir = tmp_path / "runs" / "t"
    # staleness 3 and a checkpoint every step: the kill comes right after a step whose batch left groups in
    # flight (usually: the trainer then waits for the next batch), so the resume has work to keep
    args = [*small_cfg, "trainer.checkpoint_every=1", "controller.max_staleness=3", f"rollout.num_servers={servers}",
            "controller.server_timeout_s=3", f"trainer.total_steps={STEPS}"]
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if victim == "controller":  # on a machine where generation keeps no group in flight, at step 6 anyway
            wait_for(lambda: in_flight_after(run_dir, 3) or len(read_jsonl(run_dir / "metrics.jsonl")) >= 6
                     or proc.poll() is not None, 600, "a step past the third whose batch left groups in flight")
        elif victim == "launcher":  # any time past a checkpoint: the roles it leaves stop on their own
            wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 4 or proc.poll() is not None, 600,
                     "four training steps")
        else:  # a server holds work at any time
            wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2 or proc.poll() is not None, 600,
                     "two training steps")
        assert proc.poll() is None, proc.communicate()
        roles = children(proc.pid)
        os.kill(proc.pid if victim == "launcher" else role_pid(proc.pid, victim), signal.SIGKILL)
        out, err = proc.communicate(timeout=scaled(300))
    finally:
        if proc.poll() is None:
            proc.kill()
    if victim != "rollout-1":
        if victim == "controller":  # the launcher stops the others and says how to go on
            assert proc.returncode == 1 and "process 'controller' failed" in err, err
            assert "--resume run.name=t" in err, err
        else:  # the kernel stops the roles of a killed launcher (SIGTERM): nothing is orphaned
            assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: not any(alive(p) for p in roles), 60, "every role of the stopped run to exit")
        res = run_cli(["run", "--quiet", "--resume", *args], timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        log = (run_dir / "logs" / "controller.log").read_text()
        assert re.search(r"resumed \d+ ready and \d+ pending groups", log), log  # from the checkpoint's buffer
    else:  # a server's death is survived: its work is re-dispatched, nothing resumes
        assert proc.returncode == 0, out + err
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(r["staleness_max"] <= 3 for r in recs)
    ledger = read_run_ledger(run_dir)
    assert ledger.problems() == [], ledger.summary()
    assert sum(ledger.trained.values()) == STEPS * 8 and not ledger.buffered


VICTIMS = ("controller", "trainer", "rollout-0", "rollout-1", "launcher")


def leftovers(tmp_path: Path) -> list[str]:
    """Command lines of live processes started for this test's runs (their arguments name tmp_path)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
            if str(tmp_path) in cmd and alive(int(d.name)):
                out.append(f"{d.name}: {cmd[:200]}")
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_of_a_random_role_at_a_random_moment_then_resume_keeps_the_ledger(tmp_path, small_cfg, seed):
    """A seeded `random` draws the victim (any role, or the launcher) and the moment: past a random step in
    1..STEPS-4 (a checkpoint exists, and the run is not over), then a random 0..2 s more. A killed server's run
    finishes by itself (its work re-dispatched); any other kill ends the run, and `--resume` finishes it. Then:
    every step once, staleness within the bound, the ledger exact, and no process of either run left."""
    rng = random.Random(seed)
    victim, past_step, delay_s = rng.choice(VICTIMS), rng.randint(1, STEPS - 4), rng.uniform(0.0, 2.0)
    what = f"seed {seed}: kill -9 of {victim} {delay_s:.2f} s after step {past_step}"
    run_dir = tmp_path / "runs" / "t"
    args = [*small_cfg, "trainer.checkpoint_every=1", "controller.max_staleness=3", "rollout.num_servers=2",
            "controller.server_timeout_s=3", f"trainer.total_steps={STEPS}"]
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= past_step or proc.poll() is not None, 600,
                 f"step {past_step} ({what})")
        time.sleep(delay_s)
        assert proc.poll() is None, (what, proc.communicate())
        roles = children(proc.pid)
        os.kill(proc.pid if victim == "launcher" else role_pid(proc.pid, victim), signal.SIGKILL)
        killed_at = len(read_jsonl(run_dir / "metrics.jsonl"))
        out, err = proc.communicate(timeout=scaled(300))
    finally:
        if proc.poll() is None:
            proc.kill()
    if victim.startswith("rollout"):  # survived: the other server takes the work, nothing resumes
        assert proc.returncode == 0, (what, out + err)
    else:
        assert proc.returncode == (-signal.SIGKILL if victim == "launcher" else 1), (what, err[-3000:])
        wait_for(lambda: not any(alive(p) for p in roles), 60, f"every role of the stopped run to exit ({what})")
        res = run_cli(["run", "--quiet", "--resume", *args], timeout=600)
        assert res.returncode == 0, (what, res.stdout + res.stderr[-3000:])
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), what
    assert all(r["staleness_max"] <= 3 for r in recs), (what, [r["staleness_max"] for r in recs])
    ledger = read_run_ledger(run_dir)
    assert ledger.problems() == [], (what, ledger.summary())
    assert sum(ledger.trained.values()) == STEPS * 8 and not ledger.buffered, (what, ledger.summary())
    wait_for(lambda: not leftovers(tmp_path), 30, f"no process of the runs left ({what})")
    print(f"{what} (the record had {killed_at} steps then): {ledger.summary()}")
