"""The step record (one metrics.jsonl row): what the trainer writes reads back the same, older rows
still load, non-finite numbers survive, and the trainer's builder computes each field as specified."""
from __future__ import annotations

import json
import math

import pytest

from areal_py.telemetry.metrics import JsonlWriter
from areal_py.telemetry.report import step_series
from areal_py.telemetry.step_record import PhaseTimes, StepRecord, read_step_records
from areal_py.wire import protocol as P
from trainer.rollout_batch import collate, drop_nonfinite_groups
from trainer.step_metrics import StepTiming, build_step_record

# A row as trainer.py wrote it before the record was typed (every key, in its order).
CURRENT_ROW = {
    "step": 7, "version": 7, "wall_time_s": 12.345, "reward_mean": 0.5, "scored_reward_mean": 0.4375,
    "response_len_mean": 3.5, "rejected_groups_nonfinite_reward": 0, "rejected_groups_nonfinite_logprob": 1,
    "staleness_mean": 0.75, "staleness_max": 2, "sample_staleness_hist": {"0": 3, "2": 1}, "max_staleness": 2,
    "max_token_staleness": 2, "trained_tokens": 40, "trained_tokens_total": 280, "response_tokens": 14,
    "samples": 4, "generated_tokens": 300, "server_generated_tokens": {"rollout-0": 180, "rollout-1": 120},
    "wait_s": 0.0123, "train_s": 0.4567, "publish_s": 0.0089, "gen_spans": [[10.0, 11.5], [11.6, 12.0]],
    "rollout_slot_occupancy": 0.8125, "gen_busy_s": 2.5, "loss": -0.012345, "clip_fraction": 0.0,
    "approx_kl": 0.0, "behav_weight_mean": 1.0, "kl_loss": 0.0, "entropy": 0.0, "value_loss": 0.0,
    "grad_norm": 0.75, "kl_coef": 0.0, "informative_samples": 4.0, "skipped_updates": 0.0, "prox_skipped": 1.0,
    "prox_time_s": 0.05, "ctrl_data_position": 12, "ctrl_accepted": 9, "ctrl_running": 3, "ctrl_dropped_stale": 1,
    "ctrl_dropped_uniform": 0, "ctrl_reward_timeouts": 0, "ctrl_reward_errors": 0, "ctrl_generated_tokens": 300,
    "ctrl_skipped_too_long": 0, "ctrl_dropped_aborted": 0,
}
# A row of the first metrics files: fewer fields, and a learner stat that no longer exists.
OLD_ROW = {"step": 3, "version": 3, "wall_time_s": 4.5, "reward_mean": 0.25, "staleness_mean": 0.5,
           "staleness_max": 1, "sample_staleness_hist": {"1": 2}, "trained_tokens": 10, "samples": 2,
           "wait_s": 0.1, "train_s": 0.3, "publish_s": 0.01, "informative_groups": 1.0, "loss": 0.5,
           "ctrl_accepted": 4, "ctrl_some_old_counter": 7}


def test_a_current_row_round_trips_byte_for_byte():
    line = json.dumps(CURRENT_ROW) + "\n"
    r = StepRecord.from_json(line)
    assert r.to_json_line() == line  # same keys, same order, same values
    assert r.step == 7 and r.sample_staleness_hist == {0: 3, 2: 1} and r.gen_spans == [(10.0, 11.5), (11.6, 12.0)]
    assert r.controller.dropped_stale == 1 and r.controller.generated_tokens == 300
    assert r.extras() == {}  # every key the trainer writes is a declared field
    assert StepRecord.from_dict(r.to_dict()) == r


def test_an_older_row_loads_with_defaults_and_keeps_unknown_keys():
    r = StepRecord.from_dict(OLD_ROW)
    assert r.reward_mean == 0.25 and r.gen_spans is None and r.scored_reward_mean is None
    assert r.trained_tokens_total is None and r.server_generated_tokens is None and r.controller.running is None
    assert r.extras() == {"informative_groups": 1.0}
    assert r.controller.accepted == 4 and r.controller.items() == [("accepted", 4), ("some_old_counter", 7)]
    assert json.loads(r.to_json_line()) == OLD_ROW  # nothing invented, nothing lost
    assert r.phases() == PhaseTimes(wait=0.1, proximal=0.0, train=0.3, publish=0.01)


def test_non_finite_numbers_are_written_and_read_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    for step, loss in ((1, float("nan")), (2, float("inf")), (3, 0.5)):
        w.write(StepRecord(step=step, loss=loss, reward_mean=0.1 * step).to_dict())
    w.close()
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()  # what JsonlWriter has always written
    recs = read_step_records(path)
    assert [r.step for r in recs] == [1, 2, 3] and math.isnan(recs[0].loss) and recs[1].loss == math.inf
    assert step_series(recs, lambda r: r.loss) == [(3.0, 0.5)]  # charts skip the non-finite points


def test_reading_skips_what_is_not_a_step_record_and_stops_at_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [OLD_ROW, [1, 2], {"no_step": 1}, {"step": "x"}, {"step": float("nan")}, CURRENT_ROW]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "wall_')
    assert [r.step for r in read_step_records(path)] == [3, 7]
    assert read_step_records(tmp_path / "absent.jsonl") == []


def test_phase_times_clip_the_proximal_recompute_to_the_training_time():
    assert StepRecord(step=1, train_s=0.2, prox_time_s=0.5).phases() == PhaseTimes(0.0, 0.2, 0.0, 0.0)
    assert StepRecord(step=1, train_s=1.0, prox_time_s=0.25, wait_s=float("nan")).phases() == \
        PhaseTimes(0.0, 0.25, 0.75, 0.0)


def _group(gid: int, versions: list[list[int]], reward: float = 1.0) -> P.Group:
    samples = [P.Sample(output_ids=[5] * len(v), logprobs=[-0.1] * len(v), versions=v, finish_reason="stop",
                        reward=reward if i == 0 else 0.0) for i, v in enumerate(versions)]
    return P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2], samples=samples)


def test_the_builder_computes_each_field():
    # trained version 3: group 0's samples hold tokens of versions (3, 2) and (1, 1, 3); group 1's reward is inf
    wire = P.Batch(version=3, groups=[_group(0, [[3, 2], [1, 1, 3]]), _group(1, [[3], [3]], reward=float("inf"))],
                   state={"data_position": 5, "accepted": 2, "generated_tokens": 99},
                   stats={"scored_reward_mean": 0.1234567, "gen_busy_s": 1.23456, "gen_tokens/rollout-0": 99},
                   gen_spans=[(1000.5, 1001.0)])
    batch, dropped = drop_nonfinite_groups(collate(wire.groups, pad_id=0))
    stats = {"loss": 0.123456789, "grad_norm": 2.0, "prox_time_s": 0.01, "a_new_stat": 1.0}
    r = build_step_record(trained_version=3, batch=batch, dropped=dropped, wire=wire, stats=stats,
                          timing=StepTiming(wall_time_s=10.12345, epoch0=1000.0, wait_s=0.5, train_s=0.25,
                                            publish_s=0.125),
                          trained_tokens_total=100, max_staleness=2, max_token_staleness=4)
    assert (r.step, r.version, r.wall_time_s) == (4, 4, 10.123)
    assert r.rejected_groups_nonfinite_reward == 1 and r.rejected_groups_nonfinite_logprob == 0 and r.samples == 2
    assert r.reward_mean == 0.5 and r.response_len_mean == 2.5 and r.scored_reward_mean == 0.123457
    # token staleness 0, 1, 2, 2, 0 -> mean 1.0, max 2; samples by their oldest token: one at 1, one at 2
    assert (r.staleness_mean, r.staleness_max, r.sample_staleness_hist) == (1.0, 2, {1: 1, 2: 1})
    assert (r.response_tokens, r.trained_tokens, r.trained_tokens_total) == (5, 9, 100)
    assert (r.max_staleness, r.max_token_staleness) == (2, 4)
    assert r.generated_tokens == 99 and r.server_generated_tokens == {"rollout-0": 99}
    assert r.gen_spans == [(0.5, 1.0)] and r.gen_busy_s == 1.2346 and r.rollout_slot_occupancy is None
    assert (r.wait_s, r.train_s, r.publish_s, r.prox_time_s, r.loss) == (0.5, 0.25, 0.125, 0.01, 0.123457)
    assert r.extras() == {"a_new_stat": 1.0}  # a stat the record does not declare yet is kept, not lost
    assert (r.controller.data_position, r.controller.accepted, r.controller.generated_tokens) == (5, 2, 99)
    row = json.loads(r.to_json_line())
    assert row["ctrl_data_position"] == 5 and row["sample_staleness_hist"] == {"1": 1, "2": 1}


@pytest.mark.parametrize("field", ["reward_mean", "wall_time_s"])
def test_a_summary_needs_reward_and_time(field):
    from areal_py.telemetry.run_summary import summarize_records

    with pytest.raises(ValueError, match=f"step 1 has no {field}"):
        summarize_records([StepRecord.from_dict({"step": 1, "reward_mean": 0.5, "wall_time_s": 1.0} | {field: None})])
