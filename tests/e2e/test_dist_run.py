"""`areal-py run weights.transfer=dist`: the embedded default with two servers, weights over a gloo group;
and `trainer.world_size=2`, two FSDP2 trainer ranks (gloo), in the same run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_ports, run_cli, scaled

from areal_py.telemetry.metrics import read_jsonl
from areal_py.telemetry.step_record import read_step_records


def test_two_ranks_and_dist_transfer_run_finishes_with_every_version_over_the_group(tmp_path, small_cfg):
    """Two FSDP2 trainer ranks (gloo) and two servers fed over the weight group, in one run (each had a run
    of its own before): both ranks' work is in every step record, the final model is gathered from the
    shards onto rank 0, and every version reached both servers over the group, with no weight file."""
    steps = 4
    res = run_cli(["run", "--quiet", *small_cfg, "trainer.world_size=2", "trainer.checkpoint_every=2",
                   "rollout.num_servers=2", "weights.transfer=dist",
                   f"weights.dist_port={free_ports(1)[0]}", "weights.dist_timeout_s=20",
                   "controller.max_staleness=1", f"trainer.total_steps={steps}"])
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "t"
    recs = read_step_records(run / "metrics.jsonl")
    assert [r.step for r in recs] == list(range(1, steps + 1))
    for r in recs:
        assert len(r.rank_busy_s) == 2 and all(b > 0 for b in r.rank_busy_s), r.rank_busy_s
        assert len(r.rank_tokens) == 2 and all(t > 0 for t in r.rank_tokens), r.rank_tokens
        assert r.rank_tokens_max == max(r.rank_tokens) and r.rank_tokens_min == min(r.rank_tokens)
        assert sum(r.rank_tokens) <= r.trained_tokens  # the informative rows of the batch, split
        # the off-policy statistics of both ranks' tokens, combined (trainer/rank_step.py offpolicy_across_ranks)
        assert r.offpolicy_kl_mean is not None and r.offpolicy_kl_mean >= 0.0 and 0.0 < r.offpolicy_ess <= 1.0
        assert 0 < sum(b.tokens for b in r.offpolicy_by_staleness.values()) <= r.response_tokens
    assert "rank 1/2" in (run / "logs" / "trainer-1.log").read_text()  # the second rank ran as its own process
    assert (run / "final" / "model.safetensors").is_file()  # gathered from the shards onto rank 0
    assert (run / "checkpoints" / "step_000002").is_dir()
    assert set(recs[-1].server_generated_tokens) == {"rollout-0", "rollout-1"}
    assert not (run / "weights").exists()  # no weight files: nothing went over the disk
    trainer_log = (run / "logs" / "trainer.log").read_text()
    assert "forming the weight group" in trainer_log and "stream frames" not in trainer_log  # no fallback
    for server in ("rollout-0", "rollout-1"):
        log = (run / "logs" / f"{server}.log").read_text()
        assert "joining the weight group" in log and "rejected message" not in log
        # the servers loaded each version as it was broadcast; the last one may race the run's shutdown
        loaded = [v for v in range(1, steps + 1) if f"now at version {v} " in log]
        assert loaded[:steps - 1] == list(range(1, steps)), loaded


def test_weight_swap_quick_compares_all_three_transfers(tmp_path):
    """benchmarks.weight_swap --quick: every (mode, transfer) pair has one latency per interleaved round, a
    positive floor, and the machine's load recorded before and after; each is printed with its ratio to the
    floor. (The suite's only run of this benchmark's quick mode.)"""
    out = tmp_path / "weight_swap.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.weight_swap", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=scaled(200))
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert res.stdout.count(" ratio ") == len(rep["results"]), res.stdout  # one line per (mode, transfer) pair
    assert set(rep["results"]) == {f"{m}/{p}" for m in ("recompute", "keep") for p in ("disk", "stream", "dist")}
    for row in rep["results"].values():
        assert len(row["latencies_s"]) == rep["rounds"] and min(row["latencies_s"]) > 0 and row["floor_s"] > 0
        assert row["loadavg_before"] and row["loadavg_after"] and row["started"]
    assert rep["loadavg_before"] and rep["loadavg_after"]


def _pid_of(marker: str) -> int | None:
    """The process whose command line holds `marker` (a path unique to this test's run)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    return int(d.name)
            except OSError:
                continue
    return None


@pytest.mark.slow  # a whole run (about 1.5 min here); the killed-server broadcast itself is tested in
# tests/integration/test_dist_broadcast.py in the default suite
def test_a_server_killed_mid_run_falls_back_to_stream_and_the_run_finishes(tmp_path, small_cfg):
    """rollout-1 is SIGKILLed once it runs version 2: the next broadcast ends with the named error on the trainer
    (within weights.dist_timeout_s), the trainer sends that version and the rest as stream frames, rollout-0
    goes on, and the run finishes every step."""
    steps, timeout_s = 8, 10
    run = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *small_cfg,
                             "rollout.num_servers=2", "weights.transfer=dist", f"weights.dist_port={free_ports(1)[0]}",
                             f"weights.dist_timeout_s={timeout_s}", "controller.server_timeout_s=5",
                             f"trainer.total_steps={steps}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + scaled(240)
        log1 = run / "logs" / "rollout-1.log"
        while not (log1.exists() and "now at version 2 " in log1.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "timed out waiting for rollout-1 at version 2"
            time.sleep(0.2)
        pid = _pid_of(f"{run}/config.yaml rollout.server_id=rollout-1")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=scaled(240))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, steps + 1))
    trainer_log = (run / "logs" / "trainer.log").read_text()
    failure = re.search(r"weights\.transfer=dist: \S+ (?:\d+/\d+ )?of version (\d+) failed on rank 0 of 3 .*? after "
                        r"([\d.]+)s", trainer_log)
    assert failure and float(failure.group(2)) <= timeout_s, trainer_log[-3000:]
    assert "go as stream frames" in trainer_log
    log0 = (run / "logs" / "rollout-0.log").read_text()
    assert f"now at version {steps - 1} " in log0 or f"now at version {steps} " in log0  # caught up over stream
