"""`areal-py slurm --submit` on a real one-node Slurm: munged, slurmctld and slurmd (Debian's munge and
slurm-wlm) started by this module in a temporary directory with a slurm.conf of its own (node `localhost`,
no cgroups, no accounting), the generated script submitted with the real sbatch, its roles started by the
real srun and torchrun, and the finished run's metrics and logs checked.

It skips, saying why, when a Slurm or munge program is missing or the daemons do not come up (with the
end of their logs). It touches no system-wide Slurm or munge state: its own key, socket, ports, spool and
state directories, and it stops the daemons afterwards.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_ports, run_cli, scaled

from areal_py.config import load_config
from areal_py.telemetry.step_record import read_step_records

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
NODE = "localhost"  # resolves on every machine: the roles connect to the head node by this name
STEPS = 3
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}


@dataclass
class LocalSlurm:
    dir: Path
    env: dict[str, str]  # SLURM_CONF: what sbatch, scontrol and the job's own srun read

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=30)

    def job_state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, ExitCode, ...)."""
        out = self.ctl("scontrol", "show", "job", "-o", job).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _slurm_conf(d: Path, user: str, ctld_port: int, slurmd_port: int) -> str:
    return "\n".join([
        "ClusterName=areal-test", f"SlurmctldHost={NODE}(127.0.0.1)", f"SlurmUser={user}", f"SlurmdUser={user}",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d / 'munge' / 'sock'}",
        f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        # no cgroups: the plain Linux process tracker, no task binding, no accounting
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "ReturnToService=2", "MinJobAge=600",  # finished jobs stay visible to scontrol while the test reads them
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.skip(f"no Slurm here: {', '.join(missing)} not on PATH (apt-get install slurm-wlm munge; .ci/run "
                    "installs them)")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o755)  # the socket's directory: munge wants it reachable by every user
    key = d / "munge" / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    user = pwd.getpwuid(os.getuid()).pw_name
    ctld_port, slurmd_port = free_ports(2)
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, user, ctld_port, slurmd_port))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    logs = {"munged": d / "munge" / "log", "slurmctld": d / "slurmctld.log", "slurmd": d / "slurmd.log"}
    try:
        procs.append(_start(["munged", "--foreground", "--force", f"--socket={d / 'munge' / 'sock'}",
                             f"--key-file={key}", f"--pid-file={d / 'munge' / 'pid'}", f"--log-file={logs['munged']}",
                             f"--seed-file={d / 'munge' / 'seed'}"], d / "munged.out", env))
        procs.append(_start(["slurmctld", "-D", "-i", "-f", str(conf)], d / "slurmctld.out", env))
        procs.append(_start(["slurmd", "-D", "-N", NODE, "-f", str(conf)], d / "slurmd.out", env))
        slurm = LocalSlurm(d, env)
        deadline, state = time.monotonic() + scaled(30), ""
        while time.monotonic() < deadline:
            dead = [name for name, p in zip(logs, procs, strict=True) if p.poll() is not None]
            if dead:
                break
            state = slurm.ctl("sinfo", "-h", "-n", NODE, "-o", "%t").stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        if state != "idle":
            why = "\n".join(f"--- {name} (exit code {p.poll()}): {logs[name]}\n{_tail(logs[name])}\n"
                            f"{_tail(d / (name + '.out'), 5)}" for name, p in zip(logs, procs, strict=True))
            pytest.skip(f"the one-node Slurm did not come up (node state {state!r} after the wait, a bounded "
                        f"{scaled(30):.0f}s):\n{why}")
        yield slurm
        slurm.ctl("scancel", f"--user={user}")  # a job a failed test left behind
    finally:
        _stop(procs)


def _wait_for_job(slurm: LocalSlurm, job: str, log: Path, limit_s: float) -> dict[str, str]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        state = slurm.job_state(job)
        if state.get("JobState") in DONE:
            return state
        time.sleep(1)
    slurm.ctl("scancel", job)
    raise AssertionError(f"Slurm job {job} did not finish within {limit_s:.0f}s (state {slurm.job_state(job)}); "
                         f"its log {log}:\n{_tail(log)}")


@pytest.mark.timeout(300)
def test_a_run_submitted_as_a_slurm_job_trains_and_finishes(local_slurm, small_cfg, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", local_slurm.env["SLURM_CONF"])
    (rdzv,) = free_ports(1)
    r = run_cli(["slurm", *small_cfg, f"trainer.total_steps={STEPS}", f"slurm.rdzv_port={rdzv}",
                 "slurm.stop_grace_s=5", "--submit"], timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    cfg = load_config(None, small_cfg)
    run_dir = cfg.run_dir()
    out = run_dir / "logs" / f"slurm-{job}.out"
    state = _wait_for_job(local_slurm, job, out, scaled(150))
    logs = {name: _tail(run_dir / "logs" / f"{name}.log") for name in ("controller", "trainer", "rollout-0")}
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, _tail(out), logs)
    assert "the run finished" in out.read_text()
    assert len(read_step_records(run_dir / "metrics.jsonl")) == STEPS
    assert "torch.distributed.run" in (run_dir / "slurm.sbatch").read_text()
    assert (run_dir / "final").is_dir() and (run_dir / "report.html").is_file()
    assert "rollout-0: serving, connected to tcp://localhost:" in (run_dir / "logs" / "rollout-0.log").read_text()
    pinned = load_config(run_dir / "config.yaml")
    assert (pinned.net.controller_host, pinned.net.bind_host) == (NODE, "0.0.0.0")
    assert pinned.net.keys_dir == str(run_dir / "keys")  # off loopback, so the job made and used the run's keys


def _processes_reading(cfg_file: Path) -> dict[int, list[str]]:
    """pid -> argv of every process on this machine with `cfg_file` among its arguments: the run's roles."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if str(cfg_file) in argv:
            found[int(proc.name)] = argv
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_trainer_fails_the_job_and_stops_every_step(local_slurm, small_cfg, monkeypatch):
    """SIGKILL the trainer process torchrun started mid-run: torchrun exits non-zero, and the job stops the
    controller and the rollout server (SIGTERM to their processes, which exit cleanly) and fails, naming the
    trainer step."""
    monkeypatch.setenv("SLURM_CONF", local_slurm.env["SLURM_CONF"])
    (rdzv,) = free_ports(1)
    r = run_cli(["slurm", *small_cfg, "trainer.total_steps=500", f"slurm.rdzv_port={rdzv}", "slurm.stop_grace_s=30",
                 "--submit"], timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    run_dir = load_config(None, small_cfg).run_dir()
    cfg_file, out = run_dir / "config.yaml", run_dir / "logs" / f"slurm-{job}.out"
    deadline = time.monotonic() + scaled(150)
    while not read_step_records(run_dir / "metrics.jsonl"):
        assert time.monotonic() < deadline, f"no training step within {scaled(150):.0f}s; job log:\n{_tail(out)}"
        time.sleep(1)
    workers = [pid for pid, argv in _processes_reading(cfg_file).items()
               if "trainer" in argv and "torch.distributed.run" not in argv]
    assert len(workers) == 1, _processes_reading(cfg_file)
    os.kill(workers[0], signal.SIGKILL)
    state = _wait_for_job(local_slurm, job, out, scaled(120))
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", state
    assert "step 'trainer' failed with exit code" in out.read_text()
    rcs = {n: (run_dir / "logs" / f"steps-{job}" / f"{n}.rc").read_text().strip() for n in ("controller", "rollout-0")}
    assert rcs == {"controller": "143", "rollout-0": "143"}, rcs  # each stopped by its SIGTERM handler, not killed
    deadline = time.monotonic() + scaled(20)  # slurmd reaps the steps' processes as the job ends
    while _processes_reading(cfg_file):
        assert time.monotonic() < deadline, f"left running after the job: {_processes_reading(cfg_file)}"
        time.sleep(0.5)
    assert len(read_step_records(run_dir / "metrics.jsonl")) < 500
