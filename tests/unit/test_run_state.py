"""The controller's counters: what a batch carries, and what a resume restores or recomputes."""
from __future__ import annotations

import json

from areal_py.wire import protocol as P
from controller.run_state import RunCounters


def busy_counters() -> RunCounters:
    c = RunCounters(data_position=40, dropped_stale=1, dropped_uniform=2, dropped_aborted=3, accepted=9, running=4,
                    next_gid=17, base_version=2, next_batch_version=5, aborted_in_a_row=1)
    c.add_generated("a", 100)
    c.add_generated("b", 20)
    c.add_generated("a", 5)
    return c


def test_snapshot_sets_every_field_of_the_state():
    s = busy_counters().snapshot(reward_timeouts=6, reward_errors=7, skipped_too_long=8)
    assert s.model_fields_set == set(P.ControllerState.model_fields)  # nothing left to a default
    assert s == P.ControllerState(data_position=40, accepted=9, running=4, dropped_stale=1, dropped_uniform=2,
                                  reward_timeouts=6, reward_errors=7, generated_tokens=125, skipped_too_long=8,
                                  dropped_aborted=3)


def test_generated_tokens_add_up_in_total_and_per_server():
    c = busy_counters()
    assert c.generated_tokens == 125 and c.gen_tokens_by_server == {"a": 105, "b": 20}


def test_a_checkpointed_snapshot_restores_the_counts_and_recomputes_the_rest():
    saved = json.loads(json.dumps(busy_counters().snapshot(reward_timeouts=6, reward_errors=7,
                                                           skipped_too_long=8).model_dump()))  # state.json
    c = RunCounters()
    c.restore(5, 4, P.ControllerState.model_validate(saved))
    assert (c.data_position, c.dropped_stale, c.dropped_uniform, c.dropped_aborted, c.generated_tokens) == \
        (40, 1, 2, 3, 125)
    assert c.base_version == c.next_batch_version == 5
    assert c.accepted == 20 and c.running == 0 and c.next_gid == 0  # every trained group; nothing in flight
    assert c.gen_tokens_by_server == {}


def test_a_fresh_start_and_an_older_state_restore():
    c = RunCounters()
    c.restore(0, 4, None)
    assert c == RunCounters()
    c.restore(3, 2, P.ControllerState.model_validate({"data_position": 7}))  # written before later counters
    assert c.data_position == 7 and c.accepted == 6 and c.dropped_aborted == 0 and c.base_version == 3


def test_scored_reward_mean_is_taken_once_per_batch():
    c = RunCounters()
    assert c.take_scored_reward_mean() is None
    c.add_scored([1.0, 0.0])
    c.add_scored([1.0, 1.0])
    assert c.take_scored_reward_mean() == 0.75
    assert c.take_scored_reward_mean() is None and c.scored_samples == 0
