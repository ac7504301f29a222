"""What a failed run tells the operator to do next: resume from the newest checkpoint, or start afresh."""
from __future__ import annotations

from areal_py.app.launcher import resume_hint
from areal_py.config import load_config


def test_a_run_with_checkpoints_is_told_the_resume_command_and_the_newest_step(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=exp"])
    for step in (2, 10, 4):
        (cfg.run_dir() / "checkpoints" / f"step_{step}").mkdir(parents=True)
    hint = resume_hint(cfg)
    assert "step_10" in hint and "--resume run.name=exp" in hint


def test_a_run_without_a_checkpoint_is_told_to_start_afresh(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=exp"])
    hint = resume_hint(cfg)
    assert "no checkpoint" in hint and "without --resume" in hint
