"""Roles started by hand (`areal-py serve`): kill -9 of the controller mid-run, then `areal-py serve controller
--resume` on the same config; the running trainer and rollout server rejoin it (the trainer rolling back to its
latest checkpoint), the run finishes, and every prompt taken is trained once or dropped with a reason. About
45 s on two busy cores."""
from __future__ import annotations

import os
import signal

from conftest import scaled, serve_role, wait_for

from areal_py.config import dump_config, load_config
from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl

# Steps are tens of milliseconds and the trainer may hold a few batches the controller sent ahead (up to
# max_staleness + 1), so the run must be long enough past the kill at step 3 that those cannot finish it:
# with 8 steps, one suite run saw the trainer finish right after the kill and the restarted controller wait
# for a hello that never came.
STEPS = 16


def test_kill_9_of_the_controller_then_serve_controller_resume_finishes_the_run(tmp_path, small_cfg):
    cfg = load_config(None, [*small_cfg, "trainer.checkpoint_every=2", f"trainer.total_steps={STEPS}",
                             "rollout.heartbeat_s=0.2", "weights.transfer=stream"])
    cfg_file = tmp_path / "config.yaml"
    dump_config(cfg, cfg_file)
    run_dir = cfg.run_dir()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("controller", "trainer", "rollout", "controller2")}
    procs = {"controller": serve_role("controller", cfg_file, logs["controller"]),
             "trainer": serve_role("trainer", cfg_file, logs["trainer"]),
             "rollout": serve_role("rollout", cfg_file, logs["rollout"])}

    def steps() -> list[int]:
        path = run_dir / "metrics.jsonl"
        return [r["step"] for r in read_jsonl(path)] if path.exists() else []

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    try:
        wait_for(lambda: any(s >= 3 for s in steps()) or procs["trainer"].poll() is not None, 300,
                 "step 3 of the run")
        assert procs["trainer"].poll() is None, tail("trainer")
        os.kill(procs["controller"].pid, signal.SIGKILL)
        procs["controller"].wait(10)
        reached = max(steps())
        assert reached < STEPS and procs["trainer"].poll() is None, "the run finished before the controller died"
        procs["controller2"] = serve_role("controller", cfg_file, logs["controller2"], "--resume")
        for name in ("trainer", "rollout", "controller2"):
            rc = procs[name].wait(scaled(300))
            assert rc == 0, f"{name} exited {rc}:\n{tail(name)}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs.values():
            f.close()

    trainer_log, rollout_log = tail("trainer"), tail("rollout")
    assert "the controller restarted" in (tmp_path / "trainer.log").read_text()
    assert "the controller restarted" in (tmp_path / "rollout.log").read_text(), rollout_log
    assert steps() == list(range(1, STEPS + 1)), trainer_log
    ledger = read_run_ledger(run_dir)
    assert ledger.problems() == []
    assert sum(ledger.trained.values()) == STEPS * cfg.controller.batch_size
