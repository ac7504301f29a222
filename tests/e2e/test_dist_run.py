"""`areal-py run weights.transfer=dist`: the embedded default with two servers, weights over a gloo group."""
from __future__ import annotations

from conftest import free_ports, run_cli

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
