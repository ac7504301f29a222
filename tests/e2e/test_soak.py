"""Soak: a long run of roles started by hand (`areal-py serve`), two rollout servers, one of them killed -9 every
few minutes and replaced by a fresh server (new id, as a supervisor would start one; the launcher restarts
nothing). Asserted over the whole soak:

- the run keeps training: steps in every third of the soak, and the last third's rate (steps/min) at least
  half the first third's (the grid and other tests share the CPU, so a tighter bound would measure them);
- nothing admitted is lost: the ledger at the latest checkpoint is exact (every prompt taken trained once
  or dropped with a reason, telemetry/ledger.py), and that checkpoint is near the end of the run;
- the controller's and the trainer's resident memory stay flat: the median RSS of the last third at most
  RSS_TOLERANCE times the first third's plus RSS_SLACK_MIB (allocator caches and page-ins settle in the
  first minutes; a leak of a few KiB per step over 30 minutes exceeds that);
- every killed server's replacement joins, and at the end every process exits on SIGTERM (none orphaned).

`AREAL_SOAK_S` sets the soak's length (default 1800 s), `AREAL_SOAK_KILL_S` the kill interval (default 180 s;
shortened to a quarter of the soak so even a short one sees kills). `slow`: a 30 minute test.
"""
from __future__ import annotations

import os
import re
import signal
import statistics
import time
from pathlib import Path

import pytest
from conftest import scaled, serve_role, wait_for

from areal_py.config import dump_config, load_config
from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl

SOAK_S = float(os.environ.get("AREAL_SOAK_S", "1800"))
KILL_EVERY_S = min(float(os.environ.get("AREAL_SOAK_KILL_S", "180")), SOAK_S / 4)
SAMPLE_S = 2.0
RSS_TOLERANCE, RSS_SLACK_MIB = 1.15, 64
CHECKPOINT_EVERY = 5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_S + 900)]


def rss_mib(pid: int) -> float | None:
    try:
        m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def thirds(samples: list[tuple[float, float]], t0: float, span: float) -> tuple[list[float], list[float]]:
    """The values of (time, value) samples in the first and in the last third of [t0, t0 + span]."""
    return ([v for t, v in samples if t0 <= t < t0 + span / 3],
            [v for t, v in samples if t0 + 2 * span / 3 <= t <= t0 + span])


def rate_per_min(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Growth per minute of a counter sampled as (time, value) between the samples nearest `start` and `end`."""
    a = min(samples, key=lambda s: abs(s[0] - start))
    b = min(samples, key=lambda s: abs(s[0] - end))
    return (b[1] - a[1]) / max(b[0] - a[0], 1e-9) * 60


def test_soak_two_servers_one_killed_every_few_minutes(tmp_path, small_cfg):
    cfg = load_config(None, [*small_cfg, "trainer.total_steps=1000000", f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
                             "controller.max_staleness=2", "rollout.num_servers=2", "controller.server_timeout_s=3",
                             "rollout.heartbeat_s=0.5", "run.torch_threads=1"])
    cfg_file = tmp_path / "config.yaml"
    dump_config(cfg, cfg_file)
    run_dir = cfg.run_dir()
    logs: list = []

    def start(role: str, name: str, *extra: str):
        log = (tmp_path / f"{name}.log").open("w")
        logs.append(log)
        return serve_role(role, cfg_file, log, *extra)

    procs = {"controller": start("controller", "controller"), "trainer": start("trainer", "trainer")}
    servers = [f"rollout-{i}" for i in range(2)]
    for s in servers:
        procs[s] = start("rollout", s, f"rollout.server_id={s}")

    def steps() -> int:
        path = run_dir / "metrics.jsonl"
        return len(read_jsonl(path)) if path.exists() else 0

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    step_samples: list[tuple[float, float]] = []
    rss: dict[str, list[tuple[float, float]]] = {"controller": [], "trainer": []}
    kills: list[tuple[float, str, str, int]] = []  # (time, killed, replacement, steps then)
    try:
        wait_for(lambda: steps() >= 1 or any(p.poll() is not None for p in procs.values()), 300, "the first step")
        t0 = time.monotonic()
        next_kill, n = t0 + KILL_EVERY_S, len(servers)
        while (now := time.monotonic()) < t0 + SOAK_S:
            for role in ("controller", "trainer"):
                assert procs[role].poll() is None, f"{role} exited {procs[role].returncode}:\n{tail(role)}"
                if (r := rss_mib(procs[role].pid)) is not None:
                    rss[role].append((now, r))
            step_samples.append((now, steps()))
            if now >= next_kill:
                victim = servers.pop(0)
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait(10)
                fresh = f"rollout-{n}"
                n += 1
                procs[fresh] = start("rollout", fresh, f"rollout.server_id={fresh}")
                servers.append(fresh)
                kills.append((now - t0, victim, fresh, steps()))
                next_kill += KILL_EVERY_S
            time.sleep(SAMPLE_S)
        step_samples.append((time.monotonic(), steps()))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + scaled(60)
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        orphans = [name for name, p in procs.items() if p.poll() is None]
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs:
            f.close()

    first_steps, last_steps = thirds(step_samples, t0, SOAK_S)
    first_rate = rate_per_min(step_samples, t0, t0 + SOAK_S / 3)
    last_rate = rate_per_min(step_samples, t0 + 2 * SOAK_S / 3, t0 + SOAK_S)
    med = {role: [statistics.median(x) for x in thirds(samples, t0, SOAK_S)] for role, samples in rss.items()}
    ledger = read_run_ledger(run_dir)
    total = steps()
    print(f"\nsoak {SOAK_S:.0f} s, a kill every {KILL_EVERY_S:.0f} s: {total} steps; steps/min first third "
          f"{first_rate:.1f}, last third {last_rate:.1f}; median RSS MiB (first, last third) "
          + ", ".join(f"{r} {a:.0f} -> {b:.0f}" for r, (a, b) in med.items())
          + f"; kills (s, killed, replacement, steps then) {[(round(t), v, f, s) for t, v, f, s in kills]}; "
          f"ledger at step {ledger.steps}: {ledger.summary()}")

    assert orphans == [], f"still running 60 s after SIGTERM: {orphans}"
    assert len(kills) >= 3 or SOAK_S < 4 * KILL_EVERY_S, kills
    assert first_steps[-1] > first_steps[0] and last_steps[-1] > last_steps[0], step_samples  # trains throughout
    assert last_rate >= first_rate / 2, (first_rate, last_rate)
    controller_log = (tmp_path / "controller.log").read_text()
    for _, _, fresh, at in kills:
        assert f"server {fresh} joined" in controller_log, fresh
        assert total > at, f"no step after {fresh} replaced a killed server"
    for role, (first, last) in med.items():
        assert last <= first * RSS_TOLERANCE + RSS_SLACK_MIB, (role, first, last, rss[role])
    assert ledger.problems() == [], ledger.summary()
    assert ledger.steps >= total - 2 * CHECKPOINT_EVERY, (ledger.steps, total)  # the ledger covers the run
    assert sum(ledger.trained.values()) == ledger.steps * cfg.controller.batch_size, ledger.summary()
