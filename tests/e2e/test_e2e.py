"""End-to-end runs of `areal-py run` as separate processes over ZeroMQ, on a small config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, scaled, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl
from areal_py.telemetry.report import timeline_lanes
from areal_py.telemetry.step_record import StepRecord


def metrics(tmp_path: Path) -> list[dict]:
    return read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")


def assert_bound(recs: list[dict], bound: int) -> None:
    """Every trained token, hence every sample, is at most `bound` versions old."""
    for r in recs:
        assert r["staleness_max"] <= bound, r
        assert all(int(k) <= bound for k in r["sample_staleness_hist"]), r
        assert sum(r["sample_staleness_hist"].values()) == r["samples"]


@pytest.mark.parametrize("bound,token_limit", [(0, None), (1, 4)])
def test_staleness_bound_holds(tmp_path, small_cfg, bound, token_limit):
    """The hard limit is max_token_staleness when raised, else max_staleness. Bound 1 with no raised
    token limit is checked on the two-server run below (one run fewer in the default suite)."""
    steps = 8
    res = run_cli(["run", "--quiet", *small_cfg, f"controller.max_staleness={bound}", f"trainer.total_steps={steps}",
                   *([f"controller.max_token_staleness={token_limit}"] if token_limit is not None else [])])
    assert res.returncode == 0, res.stdout + res.stderr
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(r["max_staleness"] == bound and r["max_token_staleness"] == (token_limit or bound) for r in recs)
    assert_bound(recs, token_limit or bound)
    if bound == 0:  # on-policy: every token comes from the version being trained
        assert all(r["staleness_max"] == 0 for r in recs)
    assert (tmp_path / "runs" / "t" / "final" / "config.json").is_file()
    assert 'data-chart="reward"' in (tmp_path / "runs" / "t" / "report.html").read_text()


def test_sync_mode_is_on_policy(tmp_path, small_cfg):
    res = run_cli(["run", "--quiet", *small_cfg, "run.mode=sync", "controller.max_staleness=3", "trainer.total_steps=4",
                   "run.tensorboard=true"])
    assert res.returncode == 0, res.stdout + res.stderr
    recs = metrics(tmp_path)
    assert len(recs) == 4 and all(r["max_staleness"] == 0 and r["staleness_max"] == 0 for r in recs)
    # the servers' measured activity: every step generated (a server reports going idle before the results
    # that complete a batch), and in sync mode no generation overlaps training in the report's timeline
    # (the tolerance only absorbs the ms rounding of the records)
    assert all(r["gen_spans"] and r["gen_busy_s"] > 0 and 0 < r["rollout_slot_occupancy"] <= 1 for r in recs), recs
    lanes = dict(timeline_lanes([StepRecord.from_dict(r) for r in recs]))
    gen = [(s.start, s.end) for s in lanes["generation"]]
    train = [(s.start, s.end) for s in lanes["trainer"] if s.kind in ("proximal", "train")]
    assert not [(g, t) for g in gen for t in train if min(g[1], t[1]) - max(g[0], t[0]) > 0.01], (gen, train)
    # run.tensorboard=true: the event files hold the records' scalars
    acc = EventAccumulator(str(tmp_path / "runs" / "t" / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("rollout_slot_occupancy")] == \
        [(r["step"], round(r["rollout_slot_occupancy"], 4)) for r in recs]


def test_two_servers_and_stream_transfer(tmp_path, small_cfg):
    """Two servers fed over the stream transfer; also the staleness bound 1 with the per-token limit
    left at its default (= max_staleness), as test_staleness_bound_holds checks the other bounds."""
    res = run_cli(["run", "--quiet", *small_cfg, "rollout.num_servers=2", "weights.transfer=stream",
                   "controller.max_staleness=1", "trainer.total_steps=6"])
    assert res.returncode == 0, res.stdout + res.stderr
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["max_staleness"] == 1 and r["max_token_staleness"] == 1 for r in recs)
    assert_bound(recs, 1)
    assert (tmp_path / "runs" / "t" / "final" / "config.json").is_file()
    assert 'data-chart="reward"' in (tmp_path / "runs" / "t" / "report.html").read_text()
    per_server = recs[-1]["server_generated_tokens"]
    assert set(per_server) == {"rollout-0", "rollout-1"}
    assert all(v > 0 for v in per_server.values()), per_server
    assert not (tmp_path / "runs" / "t" / "weights").exists()  # stream mode writes no weight files


def _child_pids(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True,
                         check=False).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def _long_run(small_cfg: list[str]) -> subprocess.Popen:
    """A run far longer than any test waits: the test stops it (or one of its processes) itself."""
    # SIGINT back to default in the child: a background shell (nohup ... &) starts us with it ignored,
    # and Python then never turns Ctrl-C into KeyboardInterrupt. (noqa PLW1509: the preexec_fn only resets
    # one signal handler before exec; Popen's restore_signals does not cover SIGINT.)
    return subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *small_cfg,
                             "trainer.total_steps=500"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509


def test_resume_after_kill_past_the_last_checkpoint(tmp_path, small_cfg):
    """kill -9 of the trainer 3+ steps past its last checkpoint, with disk weights (the default), then --resume:
    the crashed run's newer weight files and metric rows must not break the resumed run or its record.

    One run serves three checks, each a whole run of its own before: the crash of one process stops all
    of them (exit 1, naming it, no child left); the resume past a crash; and a second --resume of the
    finished run with more steps continues from its final checkpoint (steps, data position and
    admission counters), which is what resuming a cleanly stopped run does."""
    args = [*small_cfg, "trainer.checkpoint_every=8", "controller.max_staleness=1"]
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *args,
                             "trainer.total_steps=16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: len(metrics(tmp_path)) >= 1 or proc.poll() is not None, 600, "the first training step")
        children = _child_pids(proc.pid)
        trainer = [p for p in children if "trainer" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(children) == 3 and len(trainer) == 1, (children, proc.poll())
        # kill anywhere in 11..15: 3+ steps past the checkpoint at 8, before the run's end
        wait_for(lambda: len(metrics(tmp_path)) >= 11 or proc.poll() is not None, 300, "eleven training steps")
        os.kill(trainer[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "process 'trainer' failed" in err, err
    wait_for(lambda: not any(_alive(p) for p in children), 15, "all children of the crashed run to exit")
    crashed = [r["step"] for r in metrics(tmp_path)]
    assert 11 <= crashed[-1] < 16, crashed  # weight files v(n-2)..vn, all past the checkpoint, on disk

    res = run_cli(["run", "--quiet", "--resume", *args, "trainer.total_steps=16"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 17))  # every step once
    times = [r["wall_time_s"] for r in recs]
    assert times == sorted(times)  # never goes back
    assert "done. 16 steps" in res.stdout
    dropped = list((tmp_path / "runs" / "t").glob("metrics.jsonl.dropped-*"))  # the crashed run's rows past 8
    assert len(dropped) == 1 and [json.loads(x)["step"] for x in dropped[0].read_text().splitlines()
                                  if x.endswith("}")] == crashed[8:]
    # lossless: the groups buffered or in flight at the checkpoint were resumed, not skipped; every prompt
    # taken was trained exactly once or dropped with a reason, and resumed tokens kept the staleness bound
    ledger = read_run_ledger(tmp_path / "runs" / "t")
    assert ledger.problems() == [], ledger.summary()
    assert sum(ledger.trained.values()) == 16 * 8 and not ledger.buffered
    assert_bound(recs, 1)

    # the finished run, resumed with more steps, continues from its final checkpoint
    run_dir = tmp_path / "runs" / "t"
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["version"] == 16
    assert state["controller_state"] == {k[5:]: v for k, v in recs[-1].items() if k.startswith("ctrl_")}
    more = run_cli(["run", "--quiet", "--resume", *args, "trainer.total_steps=19"])
    assert more.returncode == 0, more.stdout + more.stderr
    after = metrics(tmp_path)[len(recs):]
    assert [r["step"] for r in after] == [17, 18, 19]
    # data position and admission counters continue from the checkpoint, never restart at zero
    ctrl = state["controller_state"]
    assert after[0]["ctrl_data_position"] > ctrl["data_position"]
    assert after[0]["ctrl_accepted"] >= ctrl["accepted"] >= 16 * 8  # 16 steps of batch 8 were admitted
    assert after[0]["wall_time_s"] >= state["wall_time_s"]
    assert_bound(after, 1)
    assert read_run_ledger(run_dir).problems() == []
    ctrl_log = (run_dir / "logs" / "controller.log").read_text()
    assert f"data position {ctrl['data_position']}, accepted {ctrl['accepted']}" in ctrl_log


def test_server_death_redispatches(tmp_path, small_cfg):
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *small_cfg,
                             "rollout.num_servers=2", "controller.server_timeout_s=3", "trainer.total_steps=10",
                             "controller.max_staleness=2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics(tmp_path)) >= 2, 180, "two training steps")
        victim = [p for p in _child_pids(proc.pid) if "rollout-1" in Path(f"/proc/{p}/cmdline").read_text()]
        os.kill(victim[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=scaled(240))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "rollout-1" in err and "continuing" in err
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert_bound(recs, 2)
    assert "declared dead" in (tmp_path / "runs" / "t" / "logs" / "controller.log").read_text()


def test_a_run_on_ports_already_in_use_is_refused(tmp_path, small_cfg):
    """A second run on the first one's ports would share its batch stream; the launcher refuses before
    creating anything, naming the key and the port."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = run_cli(["run", "--quiet", *small_cfg, f"net.batch_port={port}"], timeout=60)
    assert res.returncode != 0
    assert f"net.batch_port={port}" in res.stderr and "already in use" in res.stderr, res.stderr
    assert not (tmp_path / "runs" / "t").exists()


def test_slow_or_crashing_verifiers_do_not_stop_the_run(tmp_path, small_cfg):
    spec = ('reward.functions={accuracy: 1.0, "tests.reward_fixtures:sometimes_slow": 0.0, '
            '"tests.reward_fixtures:sometimes_raises": 0.0}')
    res = run_cli(["run", "--quiet", *small_cfg, spec, "reward.workers=2", "reward.timeout_s=1",
                   "controller.max_staleness=1", "trainer.total_steps=4"])
    assert res.returncode == 0, res.stdout + res.stderr
    last = metrics(tmp_path)[-1]
    assert last["ctrl_reward_timeouts"] > 0 and last["ctrl_reward_errors"] > 0
    log = (tmp_path / "runs" / "t" / "logs" / "controller.log").read_text()
    assert "verifier bug on" in log


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("areal_"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def test_every_process_serves_prometheus_metrics_then_ctrl_c_stops_everything(tmp_path, small_cfg):
    """Each role exports its own metrics while the run trains; then Ctrl-C (SIGINT) ends the run with
    exit code 130, saying so, and no child outlives it (one run for both checks)."""
    from conftest import free_ports

    base = free_ports(1)[0]
    proc = _long_run([*small_cfg, f"run.metrics_port={base}"])
    try:
        wait_for(lambda: len(metrics(tmp_path)) >= 3 or proc.poll() is not None, 180, "three training steps")
        children = _child_pids(proc.pid)
        ctrl, trainer, rollout = _scrape(base), _scrape(base + 1), _scrape(base + 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, err
    assert len(children) == 3, children
    wait_for(lambda: not any(_alive(p) for p in children), 15, "all children to exit")
    assert ctrl["areal_controller_accepted_groups"] > 0
    assert ctrl["areal_controller_sample_staleness_versions_count"] > 0
    assert trainer["areal_trainer_steps_total"] >= 3 and trainer["areal_trainer_trained_tokens_total"] > 0
    assert rollout["areal_rollout_generated_tokens_total"] > 0
    assert not any(k.startswith("areal_rollout") for k in trainer)  # each process exports its own role
