"""The `areal-py slurm` job script's watch loop and cleanup, run under bash as a job would run it, with stand-ins
for `srun` (runs the step's command here) and `scontrol` (two node names): which step ends the job, with
what exit code and message, and that the others are stopped. Steps are small shell commands, not roles; the
real Slurm run of real roles is tests/e2e/test_slurm_job.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from areal_py.app.slurm import CFG, PY, JobStep, sbatch_script
from areal_py.config import dump_config, load_config

FAKE_SRUN = 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n'  # drop srun's options, run the command here
FAKE_SCONTROL = "echo node-a\necho node-b\n"
FAKE_SCANCEL = "exit 1\n"  # no Slurm to signal the steps: the script falls back to signalling srun itself


def _tool(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)


def _run_job(tmp_path: Path, steps: list[JobStep], timeout: float = 120) -> tuple[subprocess.CompletedProcess, Path]:
    """The script for `steps` run as sbatch would run it (SLURM_JOB_ID 7, the stand-ins first on PATH)."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "slurm.stop_grace_s=2"])
    dump_config(cfg, cfg.run_dir() / "config.yaml")
    (cfg.run_dir() / "logs").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", FAKE_SRUN)
    _tool(bin_dir, "scontrol", FAKE_SCONTROL)
    _tool(bin_dir, "scancel", FAKE_SCANCEL)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(cfg, sys.executable, steps=steps))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node-[a-b]"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=timeout)
    return proc, cfg.run_dir()


def _sh(code: str) -> tuple[str, ...]:
    return ("bash", "-c", code)


def _until_term(say: str = ":") -> tuple[str, ...]:
    """A step that runs until SIGTERM, then exits 143 (taking its sleep with it)."""
    return _sh(f"trap 'kill $c; {say}; exit 143' TERM; sleep 60 & c=$!; wait")


def _rc(run_dir: Path, name: str) -> str:
    return (run_dir / "logs" / "steps-7" / f"{name}.rc").read_text().strip()


def test_job_ends_when_controller_and_trainer_finish_surviving_a_lost_server(tmp_path):
    """Success needs the controller and every trainer step at 0; one of two servers dying is survived,
    and the server still running at the end is stopped, not left behind. The head node is pinned first."""
    proc, run_dir = _run_job(tmp_path, [
        JobStep("controller", 0, _sh("sleep 2")),
        JobStep("trainer", 0, _sh('echo "trainer: $CUDA_VISIBLE_DEVICES"; sleep 2'), gpus=(0, 1)),
        JobStep("rollout-0", 1, _sh("exit 9"), essential=False),
        JobStep("rollout-1", 1, _until_term("echo stopped"), essential=False),
        JobStep("rollout-2", 1, (PY, "-c", "import sys; print(sys.argv[1])", CFG), essential=False)])
    assert proc.returncode == 0, proc.stderr
    assert "the run finished" in proc.stdout
    assert "rollout server 'rollout-0' died with exit code 9" in proc.stderr
    logs = run_dir / "logs"
    assert (logs / "trainer.log").read_text().strip() == "trainer: 0,1"
    assert (logs / "rollout-1.log").read_text().strip() == "stopped" and _rc(run_dir, "rollout-1") == "143"
    assert (logs / "rollout-2.log").read_text().strip() == str(run_dir / "config.yaml")  # "$PY" and "$CFG"
    pinned = load_config(run_dir / "config.yaml")
    assert (pinned.net.controller_host, pinned.weights.dist_host, pinned.net.bind_host) == ("node-a", "node-a",
                                                                                           "0.0.0.0")


def test_a_failing_trainer_stops_the_job_naming_it_and_kills_what_ignores_sigterm(tmp_path):
    proc, run_dir = _run_job(tmp_path, [
        JobStep("controller", 0, _until_term()),
        JobStep("trainer", 0, _sh("sleep 1; echo 'DistError: rank 1 lost'; exit 3")),
        JobStep("rollout-0", 1, _sh("trap '' TERM; exec sleep 30"), essential=False)])
    assert proc.returncode == 1
    assert "step 'trainer' failed with exit code 3" in proc.stderr and "DistError: rank 1 lost" in proc.stderr
    assert _rc(run_dir, "controller") == "143"
    assert "SIGKILL" in proc.stderr and _rc(run_dir, "rollout-0") == "137"  # after slurm.stop_grace_s


def test_the_last_rollout_server_failing_stops_the_job(tmp_path):
    proc, run_dir = _run_job(tmp_path, [
        JobStep("controller", 0, _until_term()),
        JobStep("trainer", 0, _until_term()),
        JobStep("rollout-0", 1, _sh("sleep 1; echo 'CUDA out of memory'; exit 5"), essential=False)])
    assert proc.returncode == 1
    assert "step 'rollout-0' failed with exit code 5" in proc.stderr and "CUDA out of memory" in proc.stderr
    assert _rc(run_dir, "controller") == "143" and _rc(run_dir, "trainer") == "143"
