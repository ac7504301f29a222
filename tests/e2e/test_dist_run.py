"""`areal-py run weights.transfer=dist`: the embedded default with two servers, weights over a gloo group."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, free_ports, run_cli, scaled

from areal_py.telemetry.metrics import read_jsonl


def test_dist_transfer_run_finishes_with_every_version_over_the_group(tmp_path, small_cfg):
    steps = 4
    res = run_cli(["run", "--quiet", *small_cfg, "rollout.num_servers=2", "weights.transfer=dist",
                   f"weights.dist_port={free_ports(1)[0]}", "weights.dist_timeout_s=20",
                   "controller.max_staleness=1", f"trainer.total_steps={steps}"])
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "t"
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert set(recs[-1]["server_generated_tokens"]) == {"rollout-0", "rollout-1"}
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
    positive floor, and the machine's load recorded before and after."""
    out = tmp_path / "weight_swap.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.weight_swap", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=scaled(200))
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {f"{m}/{p}" for m in ("recompute", "keep") for p in ("disk", "stream", "dist")}
    for row in rep["results"].values():
        assert len(row["latencies_s"]) == rep["rounds"] and min(row["latencies_s"]) > 0 and row["floor_s"] > 0
        assert row["loadavg_before"] and row["loadavg_after"] and row["started"]
    assert rep["loadavg_before"] and rep["loadavg_after"]
