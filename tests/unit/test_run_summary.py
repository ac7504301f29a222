"""Run summaries by hand: rates, windows, the time-to-threshold rule, occupancy weighting."""
import json

import pytest

from areal_py.telemetry.run_summary import (
    summarize_records,
    summarize_run,
    time_to_threshold,
    window_for,
)
from areal_py.telemetry.step_record import StepRecord


def row(step: int, t: float, reward: float, **kw) -> dict:
    """A metrics.jsonl row as the trainer writes it (the fields the summary reads)."""
    return {"step": step, "wall_time_s": t, "reward_mean": reward, "samples": 4, "trained_tokens": 10,
            "train_s": 0.5, "staleness_mean": 1.0, "staleness_max": 1, "response_len_mean": 3.0, **kw}


def rec(step: int, t: float, reward: float, **kw) -> StepRecord:
    return StepRecord.from_dict(row(step, t, reward, **kw))


def test_rates_and_windows_by_hand():
    recs = [rec(i + 1, 2.0 * (i + 1), 0.1 * i) for i in range(10)]  # 10 steps, 20 s
    s = summarize_records(recs)
    assert s.steps == 10 and s.wall_time_s == 20.0 and s.window == 5
    assert s.trained_samples == 40 and s.samples_per_s == 2.0 and s.trained_tokens_per_s == 5.0
    assert s.trainer_busy == pytest.approx(0.25)  # 10 x 0.5 s of 20 s
    assert s.reward_first == pytest.approx(0.2)   # mean of 0.0..0.4
    assert s.reward_final == pytest.approx(0.7)   # mean of 0.5..0.9
    assert s.slot_occupancy is None and s.time_to_threshold_s is None


def test_time_to_threshold_uses_the_trailing_window():
    recs = [rec(i + 1, float(i + 1), r) for i, r in enumerate([0, 0, 1, 1, 1, 1])]
    # window 2: trailing means 0, .5, 1, ... -> first >= 0.75 at step 4 (t=4)
    assert time_to_threshold(recs, 0.75, 2) == 4.0
    assert time_to_threshold(recs, 0.5, 2) == 3.0
    assert time_to_threshold(recs, 1.5, 2) is None  # never reached
    assert summarize_records(recs, reward_threshold=0.6).time_to_threshold_s == 5.0  # window 5: (0+0+1+1+1)/5


def test_occupancy_is_time_weighted_and_dropped_stale_is_the_last_count():
    recs = [rec(1, 1.0, 0, rollout_slot_occupancy=1.0, ctrl_dropped_stale=0),
            rec(2, 4.0, 0, rollout_slot_occupancy=0.5, ctrl_dropped_stale=3)]
    s = summarize_records(recs)
    assert s.slot_occupancy == pytest.approx((1.0 * 1 + 0.5 * 3) / 4)
    assert s.dropped_stale == 3


def test_window_and_errors(tmp_path):
    assert window_for(3) == 5 and window_for(200) == 20
    with pytest.raises(ValueError, match="no training steps"):
        summarize_records([])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        summarize_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row(i, i + 1.0, 0.5)) + "\n" for i in range(3)))
    assert summarize_run(tmp_path).steps == 3


def test_empty_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl holds no training steps"):
        summarize_run(tmp_path)


def test_a_run_that_never_reaches_the_threshold_and_the_final_reward_noise():
    recs = [rec(i + 1, float(i + 1), r) for i, r in enumerate([0.2, 0.4, 0.6, 0.2, 0.4, 0.6, 0.2, 0.4])]
    s = summarize_records(recs, reward_threshold=0.5)  # window 5: trailing means 0.36, 0.44, 0.36, 0.36
    assert s.time_to_threshold_s is None
    assert s.reward_final == pytest.approx(0.36)  # (0.2 + 0.4 + 0.6 + 0.2 + 0.4) / 5
    # sample stdev of the last five: deviations -.16 .04 .24 -.16 .04 -> sum sq .112 / 4 = .028; se = sqrt(.028 / 5)
    assert s.reward_final_sem == pytest.approx((0.028 / 5) ** 0.5)
    assert summarize_records(recs[:3], reward_threshold=0.0).time_to_threshold_s is None  # shorter than the window


def test_prompt_length_of_the_final_window_by_hand():
    # 6 steps, window 5: the last five. Steps 2-6 have (trained - response) / samples = 6/4, 6/4, 6/4, 10/4, 10/4
    recs = [rec(i + 1, float(i + 1), 0.5, trained_tokens=tt, response_tokens=4)
            for i, tt in enumerate([100, 10, 10, 10, 14, 14])]
    assert summarize_records(recs).prompt_len_final == pytest.approx((3 * 6 + 2 * 10) / 20)
    assert summarize_records([rec(1, 1.0, 0.5)]).prompt_len_final is None  # response_tokens not recorded
