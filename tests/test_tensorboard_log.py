"""TensorBoard mirror of metrics.jsonl: the scalars written are the ones read back."""
import sys

import pytest

from areal_py.tensorboard_log import TensorBoardLog, scalars


def test_scalars_keep_numbers_only():
    rec = {"step": 3, "reward_mean": 0.5, "samples": 64, "flag": True, "gen_spans": [[0, 1]],
           "server_generated_tokens": {"a": 1}, "sample_staleness_hist": {"0": 10, "2": 6}}
    assert scalars(rec) == {"reward_mean": 0.5, "samples": 64.0, "sample_staleness/0": 10.0,
                            "sample_staleness/2": 6.0}


def test_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLog(tmp_path)
    for step, reward in [(1, 0.25), (2, 0.5), (3, 0.75)]:
        tb.write({"step": step, "reward_mean": reward, "loss": -reward})
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"reward_mean", "loss"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in acc.Scalars("loss")] == [-0.25, -0.5, -0.75]


def test_missing_package_names_the_option_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match=r"run.tensorboard=true needs the tensorboard package: pip install"):
        TensorBoardLog(tmp_path)
