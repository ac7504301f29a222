"""The ledger's rule (every prompt taken: trained once, dropped or buffered), the step record's ledger fields,
the counters a resumed buffer restores, and the one checkpoint rule both sides use."""
from __future__ import annotations

import json

from areal_py.config import load_config
from areal_py.telemetry.ledger import ledger_from_records, main, read_run_ledger
from areal_py.telemetry.step_record import StepRecord
from areal_py.wire import protocol as P
from controller.run_state import RunCounters
from trainer.step_metrics import ledger_fields


def rec(step: int, trained: list[int], dropped: dict | None = None, position: int = 0) -> StepRecord:
    return StepRecord(step=step, trained_prompts=trained, dropped_prompts=dropped or {},
                      controller={"data_position": position})


def sample(reward: float = 1.0) -> P.Sample:
    return P.Sample(output_ids=[5, 2], logprobs=[-0.1, -0.2], versions=[0, 0], finish_reason="stop", reward=reward)


def group(gid: int, prompt: int) -> P.Group:
    return P.Group(gid=gid, prompt_index=prompt, prompt_ids=[1, 5], samples=[sample(), sample(0.0)])


def test_a_complete_ledger_has_no_problems():
    records = [rec(1, [0, 2], {"too_long": [1]}, position=5), rec(2, [3, 5], {"stale": [4]}, position=7)]
    led = ledger_from_records(records, buffered=[6])
    assert led.data_position == 7 and led.problems() == []
    assert led.summary() == "7 prompts taken over 2 steps: 4 trained, 2 dropped (stale 1, too_long 1), 1 still buffered"


def test_lost_twice_and_beyond_the_position_are_each_named():
    records = [rec(1, [0, 1]), rec(2, [1, 9], {"uniform": [0]}, position=4)]
    problems = ledger_from_records(records).problems()
    assert problems == ["2 prompt(s) neither trained, dropped nor buffered (lost): [2, 3]",
                        ("2 prompt(s) accounted for more than once: 0 (trained 1, dropped ['uniform'], buffered 0), "
                         "1 (trained 2, dropped [], buffered 0)"),
                        "1 prompt(s) at or past the data position 4: [9]"]


def test_a_run_dir_is_read_up_to_its_latest_checkpoint(tmp_path, capsys):
    """Rows past the checkpoint (a crashed run's, not yet cut by a resume) are not counted; the checkpoint's
    buffer and position are."""
    rows = [rec(1, [0, 1], position=4), rec(2, [2, 3], position=6), rec(3, [4, 5], position=8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    ckpt = tmp_path / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_000002")
    buffer = P.ControllerBuffer(ready=[group(4, 4)], pending=[P.PendingGroup(gid=5, prompt_index=5, prompt_ids=[1])])
    (ckpt / "state.json").write_text(json.dumps({"version": 2, "controller_state": {"data_position": 6},
                                                 "controller_buffer": buffer.model_dump()}))
    led = read_run_ledger(tmp_path)
    assert (led.steps, led.data_position, sorted(led.buffered)) == (2, 6, [4, 5]) and led.problems() == []
    assert main([str(tmp_path)]) == 0
    assert "6 prompts taken over 2 steps: 4 trained" in capsys.readouterr().out
    (ckpt / "state.json").write_text(json.dumps({"version": 2, "controller_state": {"data_position": 6}}))
    assert main([str(tmp_path)]) == 1  # without the buffer, prompts 4 and 5 are lost
    assert "ledger error: 2 prompt(s) neither trained" in capsys.readouterr().out


def test_ledger_fields_map_nonfinite_positions_to_prompts():
    wire = P.Batch(version=0, groups=[group(0, 10), group(1, 11), group(2, 12)], state=P.ControllerState(),
                   dropped_prompts={"stale": [7], "too_long": [8]})
    fields = ledger_fields(wire, {"nonfinite_reward": [1], "nonfinite_logprob": []})
    assert fields == {"trained_prompts": [10, 12],
                      "dropped_prompts": {"stale": [7], "too_long": [8], "nonfinite_reward": [11]}}


def test_drops_are_counted_and_taken_once_per_batch():
    c = RunCounters()
    c.drop("stale", [3, 4])
    c.note_dropped("too_long", [5])
    c.drop("uniform", [])
    assert (c.dropped_stale, c.dropped_uniform) == (2, 0)
    assert c.take_dropped() == {"stale": [3, 4], "too_long": [5]}
    assert c.take_dropped() == {}


def test_restore_counts_the_buffer_as_admitted():
    """accepted = version * batch_size + ready; running = pending; gids go on past the buffer's."""
    c = RunCounters()
    buffer = P.ControllerBuffer(ready=[group(7, 7)], pending=[P.PendingGroup(gid=8, prompt_index=8, prompt_ids=[1]),
                                                              P.PendingGroup(gid=9, prompt_index=9, prompt_ids=[1])],
                                next_gid=10)
    c.restore(3, 2, P.ControllerState(data_position=10, accepted=7, running=2), buffer)
    assert (c.accepted, c.running, c.next_gid, c.data_position) == (7, 2, 10, 10)
    c.restore(3, 2, P.ControllerState(data_position=10), None)  # a checkpoint without a buffer
    assert (c.accepted, c.running) == (6, 0)


def test_checkpoints_at_matches_the_trainer_schedule():
    t = load_config(None, ["trainer.checkpoint_every=4", "trainer.total_steps=10"]).trainer
    assert [v for v in range(1, 11) if t.checkpoints_at(v)] == [4, 8, 10]
    t = load_config(None, ["trainer.checkpoint_every=0", "trainer.total_steps=3"]).trainer
    assert [v for v in range(1, 4) if t.checkpoints_at(v)] == [3]
