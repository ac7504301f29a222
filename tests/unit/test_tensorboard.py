"""TensorBoard mirror of metrics.jsonl: the scalars written are the ones read back, and a missing
package stops `areal-py run` before anything starts. `tensorboard` is in the test extra, so the
read-back test runs (never skips) in CI."""
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from areal_py.app.launcher import prepare_run
from areal_py.config import ConfigError
from areal_py.telemetry.step_record import StepRecord
from areal_py.telemetry.tensorboard import TensorBoardLog, scalars


def test_scalars_are_every_number_nested_dicts_flattened():
    rec = StepRecord.from_dict({"step": 3, "reward_mean": 0.5, "samples": 64, "flag": True, "gen_spans": [[0, 1]],
                                "mode": "sync", "server_generated_tokens": {"rollout-0": 7},
                                "sample_staleness_hist": {"0": 10, "2": 6}, "ctrl_accepted": 5, "informative_groups": 2})
    assert scalars(rec) == {"reward_mean": 0.5, "samples": 64.0, "server_generated_tokens/rollout-0": 7.0,
                            "sample_staleness_hist/0": 10.0, "sample_staleness_hist/2": 6.0,
                            "informative_groups": 2.0, "ctrl_accepted": 5.0}  # extras and controller counters too


def test_events_read_back(tmp_path):
    tb = TensorBoardLog(tmp_path)
    for step, reward in [(1, 0.25), (2, 0.5), (3, 0.75)]:
        tb.write(StepRecord(step=step, reward_mean=reward, loss=-reward, sample_staleness_hist={1: step}))
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward_mean", "loss", "sample_staleness_hist/1"}
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in acc.Scalars("loss")] == [-0.25, -0.5, -0.75]
    assert [(e.step, e.value) for e in acc.Scalars("sample_staleness_hist/1")] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_resume_purges_the_crashed_runs_steps_past_the_checkpoint(tmp_path):
    """A run that reached step 5, resumed from the step-3 checkpoint: steps 4 and 5 appear once, re-trained."""
    tb = TensorBoardLog(tmp_path)
    for step in range(1, 6):
        tb.write(StepRecord(step=step, reward_mean=0.1 * step))
    tb.close()
    tb = TensorBoardLog(tmp_path, resume_step=3)
    for step in (4, 5):
        tb.write(StepRecord(step=step, reward_mean=1.0 + step))
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("reward_mean")] == \
        [(1, 0.1), (2, 0.2), (3, 0.3), (4, 5.0), (5, 6.0)]


def test_missing_package_names_the_option_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match=r"run.tensorboard=true needs the tensorboard package: pip install"):
        TensorBoardLog(tmp_path)
    # the launcher checks before it creates the run directory or starts a process
    with pytest.raises(ConfigError, match=r"run.tensorboard=true .* pip install"):
        prepare_run(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=t", "run.tensorboard=true"], resume=False)
    assert not (tmp_path / "runs").exists()
    assert prepare_run(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=t"], resume=False).run.tensorboard is False
