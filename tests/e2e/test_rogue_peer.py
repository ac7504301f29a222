"""A run with a rogue local peer (issue 20): while `areal-py run` trains, tests/rogue_peer.py sends the issue's
forged messages (a Result with token version 1,000,000 from a server it joined as, results for unknown gids, a
TrainerDone, WeightsReady(path=/etc/passwd) and its own racing weights, two receivers on the batch port). The run
finishes its steps, every forged message is counted by reason on the controller's /metrics, nothing reaches the
thieves, the ledger and the staleness bound hold.

The default suite runs one short run; the learning comparison (reward gain against an undisturbed run of the
same config and seed, over 2 seeds) is `slow`."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, controller_rejected, free_ports, scaled, wait_for
from rogue_peer import Rogue

from areal_py.config import load_config
from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl


def run(tmp_path, small_cfg: list[str], steps: int, *, rogue: bool, name: str = "t", extra: tuple[str, ...] = ()) -> dict:
    """One run; with `rogue`, attacked once its first step is recorded. Returns its records and the counts."""
    metrics_port = free_ports(1)[0]
    args = [*small_cfg, f"trainer.total_steps={steps}", "controller.server_timeout_s=3",
            f"run.metrics_port={metrics_port}", f"run.name={name}", *extra]
    run_dir = tmp_path / "runs" / name
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict = {"sent": {}, "counted": {}, "stolen": 0}
    peer = None
    try:
        if rogue:
            wait_for(lambda: bool(read_jsonl(run_dir / "metrics.jsonl")) or proc.poll() is not None, 300,
                     "the run's first step")
            assert proc.poll() is None, proc.communicate()
            before = {r: controller_rejected(metrics_port, r) for r in ("unknown_server", "not_trainer", "bad_version")}
            peer = Rogue(load_config(run_dir / "config.yaml"), tmp_path)
            version = read_jsonl(run_dir / "metrics.jsonl")[-1]["version"]
            out["sent"] = dict(peer.attack(version, seconds=3.0))
            wait_for(lambda: controller_rejected(metrics_port, "not_trainer") - before["not_trainer"] >= 4
                     or proc.poll() is not None, 60, "the controller to count the forged trainer messages")
            out["counted"] = {r: controller_rejected(metrics_port, r) - v for r, v in before.items()}
        _, err = proc.communicate(timeout=scaled(600))
        if peer is not None:
            out["stolen"] = peer.steal()
    finally:
        if peer is not None:
            peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    out["records"] = read_jsonl(run_dir / "metrics.jsonl")
    out["ledger"] = read_run_ledger(run_dir)
    out["log"] = (run_dir / "logs" / "controller.log").read_text()
    return out


def check_invariants(res: dict, steps: int) -> None:
    recs = res["records"]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(r["staleness_max"] <= 2 for r in recs)  # controller.max_staleness's default
    assert res["ledger"].problems() == [], res["ledger"].summary()


def test_a_rogue_peer_is_counted_and_the_run_finishes(tmp_path, small_cfg):
    steps = 60  # a step takes well under a second here: the run must outlive the attack to be read
    res = run(tmp_path, small_cfg, steps, rogue=True)
    check_invariants(res, steps)
    sent, counted = res["sent"], res["counted"]
    assert counted["not_trainer"] == sent["not_trainer"] == 4, res
    assert counted["unknown_server"] >= sent["unknown_server"] == 13, res
    # each poisoned group: its first result refused as bad_version (the rest are stale: a new attempt elsewhere)
    assert counted["bad_version"] >= sent.get("poisoned_groups", 0), res
    assert res["stolen"] == 0
    assert f"trainer finished at version {steps}" in res["log"]


def gain(records: list[dict], k: int = 5) -> float:
    """Mean reward of the last k steps minus that of the first k."""
    r = [x["reward_mean"] for x in records]
    return sum(r[-k:]) / k - sum(r[:k]) / k


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_rogue_peer_leaves_learning_as_undisturbed(tmp_path, small_cfg, seed):
    steps = 30
    free = run(tmp_path, small_cfg, steps, rogue=False, name="free", extra=(f"run.seed={seed}",))
    attacked = run(tmp_path, small_cfg, steps, rogue=True, name="rogue", extra=(f"run.seed={seed}",))
    for res in (free, attacked):
        check_invariants(res, steps)
    g_free, g_rogue = gain(free["records"]), gain(attacked["records"])
    print(f"seed {seed}: reward gain undisturbed {g_free:+.3f}, with the rogue peer {g_rogue:+.3f}")
    # an asynchronous run is not deterministic: the attacked run's gain is within 0.25 of the undisturbed run's
    # (the "within noise"), and where the undisturbed run clearly learned, the attacked one learned too.
    # A seed whose undisturbed run does not learn in 30 steps (seen under heavy load) still checks the first.
    assert abs(g_rogue - g_free) < 0.25, (g_free, g_rogue)
    if g_free > 0.1:
        assert g_rogue > 0, (g_free, g_rogue)
