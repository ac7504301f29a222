"""The launcher's side of resume, without starting processes: which run directories `run` and `run --resume`
accept, what they say otherwise, the progress bar across a resume's cut-back, and a report that cannot be
written. (tests/e2e/test_e2e.py resumes real runs.)"""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from conftest import net_overrides

from areal_py.app import launcher
from areal_py.config import load_config
from areal_py.telemetry.metrics import truncate_after_step
from trainer.checkpoint import save_checkpoint


def _overrides(tmp_path) -> list[str]:
    return [f"run.output_dir={tmp_path / 'runs'}", "run.name=t", "run.dashboard_port=0", *net_overrides()]


def _failed_start(tmp_path):
    """What a run that died before its first checkpoint leaves: a config, logs, a few metric rows."""
    d = tmp_path / "runs" / "t"
    (d / "logs").mkdir(parents=True)
    (d / "checkpoints" / ".tmp_step_000004").mkdir(parents=True)  # a save the crash interrupted
    (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return d


def test_resume_without_a_checkpoint_fails_at_once_saying_what_to_do(tmp_path):
    d = _failed_start(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        launcher.prepare_run(None, _overrides(tmp_path), resume=True)
    msg = str(e.value)
    assert str(d) in msg and "no checkpoint" in msg and "without --resume" in msg
    assert (d / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # nothing touched


def test_a_failed_start_leaves_the_run_name_reusable(tmp_path, capsys):
    d = _failed_start(tmp_path)
    cfg = launcher.prepare_run(None, _overrides(tmp_path), resume=False)
    assert cfg.run_dir() == d and not (d / "metrics.jsonl").exists()
    moved = list(d.glob("metrics.jsonl.abandoned-*"))
    assert len(moved) == 1 and moved[0].read_text() == '{"step": 1}\n{"step": 2}\n'  # kept, out of the way
    assert str(moved[0]) in capsys.readouterr().err


def test_a_run_with_a_checkpoint_is_not_restarted_over(tmp_path):
    d = _failed_start(tmp_path)
    m = torch.nn.Linear(2, 2)
    save_checkpoint(d / "checkpoints", {"policy": m}, {}, {"version": 4})
    with pytest.raises(FileExistsError) as e:
        launcher.prepare_run(None, _overrides(tmp_path), resume=False)
    assert "step_000004" in str(e.value) and "--resume" in str(e.value) and "run.name" in str(e.value)
    assert (d / "metrics.jsonl").is_file()
    assert launcher.prepare_run(None, _overrides(tmp_path), resume=True).run_dir() == d
    # without run.name, --resume picks the run that has a checkpoint
    other = tmp_path / "runs" / "no-checkpoint"
    (other / "checkpoints").mkdir(parents=True)
    assert launcher.latest_run_name(tmp_path / "runs") == "t"


def test_progress_follows_a_resume_cutting_rows_back(tmp_path, monkeypatch):
    """The resumed trainer cuts metrics.jsonl back to its checkpoint while the launcher watches it: the bar
    goes back with it instead of standing still until the file is longer than before."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=t", "trainer.total_steps=8"])
    path = cfg.run_dir() / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    row = {"wall_time_s": 1.0, "reward_mean": 0.0, "staleness_mean": 0.0, "staleness_max": 0,
           "generated_tokens": 1, "trained_tokens_total": 1}

    def append(steps):
        with path.open("a") as f:
            f.writelines(json.dumps({"step": s, **row}) + "\n" for s in steps)

    append(range(1, 7))
    shown = []

    class Bar:  # what the progress bar shows after each change
        def __init__(self, total, initial, **kw):
            self.n = initial

        def update(self, k):
            self.n += k
            shown.append(self.n)

        def set_postfix(self, _):
            pass

        def close(self):
            pass

    script = [lambda: truncate_after_step(path, 4), lambda: append(range(5, 9))]

    class Proc:  # the trainer: cuts back, trains steps 5..8, exits
        def poll(self):
            if script:
                script.pop(0)()
                return None
            return 0

        def wait(self, timeout=None):
            return 0

    class Done(Proc):
        def poll(self):
            return 0

    monkeypatch.setattr(launcher, "tqdm", Bar)
    children = [launcher.Child("controller", Done(), tmp_path / "c.log"), launcher.Child("trainer", Proc(), tmp_path / "t.log")]
    assert launcher.monitor(cfg, children, quiet=True) == 0
    assert shown == [4, 8]


def test_a_report_that_cannot_be_written_keeps_the_exit_code(tmp_path, monkeypatch, capsys):
    import areal_py.telemetry.report

    def full(run_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "report.html"))

    monkeypatch.setattr(areal_py.telemetry.report, "write_report", full)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=t"])
    assert launcher.finish(cfg, 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg.run_dir() / "report.html") in err[0] and "No space left" in err[0], err
